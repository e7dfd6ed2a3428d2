"""FP8 for frozen Linear weights (`--mixed-precision fp8`): a speed and memory mode, not a file format.

DiffFit freezes every weight matrix, so each block Linear needs only two matmuls per step: the
forward `x W^T` and the input gradient `g W`. Both run through `torch._scaled_mm` on float8
operands; the weight-gradient matmul (a third of full training's FLOPs) never runs. The weight is
quantized once, to float8_e4m3fn with one fp32 scale per tensor, and kept once (1 byte a value, half of
bf16: what lets a 12B FLUX.1 train on a 24 GB card). `_scaled_mm` wants its second operand
column-major: the forward's W^T is a view of the stored W, and the backward makes a transposed copy of
one layer's weight at a time (1 byte a value read and written per layer and step, small next to the
matmuls; a resident second copy would double the fp8 memory). Activations are scaled per tensor on the
fly (e4m3), incoming gradients too (e5m2, whose range suits gradients). Biases, and gamma where DiffFit
put one on the projection (`ScaledLinear`), stay trainable Parameters under their original names, so
optimizers, checkpoints and adapter files see exactly what they see in bf16; the fp8 tensors are
non-persistent buffers and never reach a file.

Why not torchao (checked against pytorch/ao, 2026): its training path,
`torchao.float8.convert_to_float8_training` (`Float8Linear`), keeps the weight in high precision,
re-casts it every step and always computes `grad_weight` in `matmul_with_hp_or_float8_args.backward`;
its inference configs (`Float8DynamicActivationFloat8WeightConfig`) cannot run backward at all
("derivative for aten::_scaled_mm is not implemented", pytorch/ao#4376). Neither does
forward + input gradient on a frozen fp8 weight, which is all DiffFit needs.

Each family says what stays bf16 (`Family.fp8_keep`): the embedders, the modulation projections (DiT's
adaLN) and the final layer. They are small next to the blocks, and the modulation outputs scale every
activation of a block, so their error would be amplified everywhere.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn

from difffit.engine.models.scaled_linear import ScaledLinear

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# What DiT keeps bf16: fnmatch patterns over module names (see the module docstring).
KEEP_BF16 = ("t_embedder.*", "y_embedder.*", "x_embedder.*", "final_layer.*", "*.adaLN_modulation.*")
# `_scaled_mm` multiplies float8 matrices whose inner and outer dimensions are multiples of 16; a Linear
# of another shape stays bf16.
FP8_MULTIPLE = 16


def quantize(x: torch.Tensor, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (float8 values, fp32 scale) with x ~= values * scale; one scale for the whole tensor.

    The scale maps |x|'s maximum onto the format's largest finite value; computed on the device,
    so no host sync.
    """
    amax = x.detach().abs().amax().float().clamp(min=1e-12)
    scale = amax / torch.finfo(dtype).max
    values = (x.float() / scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    return values, scale


def scaled_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    kernel: bool = True,
) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b) for float8 `a` (row-major) and `b` (column-major), in `out_dtype`.

    `kernel=False` dequantizes and multiplies in fp32: the same numbers up to accumulation order,
    used as the reference in tests (and wherever `_scaled_mm` has no kernel).
    """
    if kernel:
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)


class FrozenFP8Matmul(torch.autograd.Function):
    """y = x W^T with W frozen in fp8: forward and input gradient through `_scaled_mm`, no weight gradient."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype, kernel: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        ctx.x_dtype, ctx.kernel = x.dtype, kernel
        flat = x.reshape(-1, x.shape[-1])
        x8, x_scale = quantize(flat, E4M3)
        out = scaled_matmul(x8, weight.t(), x_scale, scale, out_dtype, kernel)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scale = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        g8, g_scale = quantize(flat, E5M2)
        # grad_x = g W, with W column-major: a transposed copy of this layer's weight, viewed transposed.
        column_major = weight.t().contiguous().t()
        grad_x = scaled_matmul(g8, column_major, g_scale, scale, torch.bfloat16, ctx.kernel)
        grad_x = grad_x.to(ctx.x_dtype).reshape(*grad.shape[:-1], weight.shape[1])
        return grad_x, None, None, None, None


class FP8FrozenLinear(nn.Module):
    """A frozen nn.Linear with its weight in float8; the bias (if any) is the original Parameter, and so is
    a ScaledLinear's gamma (DiffFit's trainable scale on the output), which multiplies the output as it does on
    the float projection."""

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype = torch.bfloat16, kernel: bool = True):
        super().__init__()
        if linear.weight.requires_grad:
            raise ValueError("FP8FrozenLinear is for frozen weights only")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize(linear.weight.detach(), E4M3)
        # Non-persistent: fp8 is a speed mode; state dicts, checkpoints and adapters never see it.
        self.register_buffer("weight_fp8", weight, persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.bias = linear.bias
        self.gamma_ = linear.gamma_ if isinstance(linear, ScaledLinear) else None
        self.out_dtype, self.kernel = out_dtype, kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = FrozenFP8Matmul.apply(x, self.weight_fp8, self.weight_scale, self.out_dtype, self.kernel)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out if self.gamma_ is None else out * self.gamma_.to(out.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_fp8.float() * self.weight_scale

    def extra_repr(self) -> str:
        gamma = ", gamma" if self.gamma_ is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=float8_e4m3fn{gamma}"


def quantizable(name: str, module: nn.Module, keep: tuple[str, ...]) -> bool:
    """Whether the module `name` is a frozen Linear (or a ScaledLinear) that goes float8: not kept by a
    `keep` pattern, and of a shape `_scaled_mm` multiplies."""
    return (
        type(module) in (nn.Linear, ScaledLinear)
        and not module.weight.requires_grad
        and module.in_features % FP8_MULTIPLE == 0
        and module.out_features % FP8_MULTIPLE == 0
        and not any(fnmatchcase(name, pattern) for pattern in keep)
    )


def quantize_frozen_linears(
    model: nn.Module, *, keep: tuple[str, ...] = KEEP_BF16, out_dtype: torch.dtype = torch.bfloat16, kernel: bool = True
) -> int:
    """Swap every frozen nn.Linear (and ScaledLinear) that `keep` does not name for an FP8FrozenLinear, in
    place; returns how many.

    Call after the method has set requires_grad (trainable weights, as in full fine-tuning or LoRA's
    own matrices, are left alone; a peft LoRA layer's frozen `base_layer` goes float8 under it) and
    before the optimizer is built (biases and gamma keep their identity either way). Quantize before
    moving the model to the GPU: the device then holds 1 byte per frozen value, never the bf16 copy.
    `kernel=False` runs the dequantizing reference matmul instead of `_scaled_mm`.
    """
    swaps = [(name, module) for name, module in model.named_modules() if quantizable(name, module, keep)]
    for name, linear in swaps:
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, FP8FrozenLinear(linear, out_dtype, kernel))
    return len(swaps)


def reference_linear(module: FP8FrozenLinear, x: torch.Tensor) -> torch.Tensor:
    """The dequantized fp32 computation an FP8FrozenLinear approximates (for tests and error reports)."""
    out = F.linear(x.float(), module.dequantized_weight(), None if module.bias is None else module.bias.float())
    return out if module.gamma_ is None else out * module.gamma_.float()
