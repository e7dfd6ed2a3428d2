"""FP8 frozen weights: the autograd function's math, the module swap, and the kernel where torch has one."""

import pytest
import torch
from torch import nn

from difffit.engine.devices import fp8_support, require_fp8
from difffit.engine.errors import DiffFitError
from difffit.engine.methods.trainable import prepare_model, trainable_parameters
from difffit.engine.models.dit import DiT, DiTConfig
from difffit.engine.models.fp8 import (
    E4M3,
    E5M2,
    FP8FrozenLinear,
    quantize,
    quantize_frozen_linears,
    reference_linear,
)


def _kernel_reason() -> str | None:
    """Why torch._scaled_mm cannot run on this machine's default device (None: it can)."""
    try:
        a = torch.zeros(16, 16, dtype=E4M3)
        torch._scaled_mm(a, a.t(), scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as exc:
        return f"torch._scaled_mm has no kernel here ({str(exc).splitlines()[0]})"
    return None


def _frozen_linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(64, 48)
    linear.weight.requires_grad_(False)
    return linear


def test_quantize_round_trips_within_e4m3_precision():
    x = torch.randn(256, 64) * 3
    values, scale = quantize(x)
    assert values.dtype == E4M3 and scale.dtype == torch.float32 and scale.dim() == 0
    # e4m3 keeps 3 mantissa bits: relative error at most 2**-4 for normal values.
    err = (values.float() * scale - x).abs()
    assert (err <= x.abs() * 2**-4 + scale * 2**-9).all()


@pytest.mark.parametrize("kernel", [False, True])
def test_gradients_match_dequantized_reference(kernel):
    if kernel and (reason := _kernel_reason()):
        pytest.skip(reason)
    module = FP8FrozenLinear(_frozen_linear(), kernel=kernel)
    x = torch.randn(2, 5, 64, requires_grad=True)
    out = module(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 48)
    weights = torch.randn(2, 5, 48)
    (out.float() * weights).sum().backward()
    grad_x, grad_b = x.grad.clone(), module.bias.grad.clone()

    x_ref = x.detach().clone().requires_grad_(True)
    bias = module.bias.detach().clone().requires_grad_(True)
    module.bias = nn.Parameter(bias)
    ref = reference_linear(module, x_ref)
    (ref * weights).sum().backward()
    # fp8 activations and gradients (e4m3 / e5m2) against an fp32 matmul on the same fp8 weight.
    assert (out.float() - ref).abs().max() < 0.08 * ref.abs().max()
    assert (grad_x - x_ref.grad).abs().max() < 0.15 * x_ref.grad.abs().max()
    torch.testing.assert_close(grad_b, module.bias.grad, rtol=1e-2, atol=1e-2)  # bias: bf16 output grad


def test_kernel_and_dequantized_path_agree():
    if reason := _kernel_reason():
        pytest.skip(reason)
    linear = _frozen_linear(1)
    fast, slow = FP8FrozenLinear(linear, kernel=True), FP8FrozenLinear(linear, kernel=False)
    x = torch.randn(32, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    fast(x).float().square().sum().backward()
    slow(x2).float().square().sum().backward()
    torch.testing.assert_close(fast(x).float(), slow(x2).float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad, x2.grad, rtol=5e-2, atol=5e-2)


def test_weight_is_frozen_fp8_and_gets_no_gradient():
    module = FP8FrozenLinear(_frozen_linear(), kernel=False)
    assert [n for n, p in module.named_parameters()] == ["bias"]
    assert module.weight_fp8.dtype == E4M3 and not module.weight_fp8.requires_grad
    x = torch.randn(4, 64, requires_grad=True)
    module(x).float().sum().backward()
    assert module.weight_fp8.grad is None
    # One float8 copy of the weight, 1 byte a value: half of bf16's memory (a resident transposed copy
    # for the backward would make it as heavy as bf16 and defeat the memory mode).
    fp8_bytes = sum(b.numel() * b.element_size() for b in module.buffers() if b.dtype in (E4M3, E5M2))
    assert fp8_bytes == 64 * 48
    assert module.state_dict().keys() == {"bias"}  # fp8 never reaches a file
    with pytest.raises(ValueError):
        FP8FrozenLinear(nn.Linear(4, 4))  # a trainable weight is refused


def _tiny_difffit():
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, hidden_size=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10))
    prepare_model(model, "difffit")
    return model


def test_swap_keeps_adaln_embedders_final_layer_and_parameter_names():
    model = _tiny_difffit()
    names_before = set(trainable_parameters(model))
    biases = {n: p for n, p in trainable_parameters(model).items()}
    assert quantize_frozen_linears(model, kernel=False) == 2 * 4  # qkv, proj, fc1, fc2 per block
    for block in model.blocks:
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert isinstance(linear, FP8FrozenLinear)
        assert type(block.adaLN_modulation[1]) is nn.Linear
    assert type(model.final_layer.linear) is nn.Linear and type(model.final_layer.adaLN_modulation[1]) is nn.Linear
    assert all(type(m) is nn.Linear for m in model.t_embedder.mlp if isinstance(m, nn.Linear | FP8FrozenLinear))
    # The trainable tensors are the same Parameter objects under the same names: the optimizer,
    # checkpoints and the adapter file are unchanged by fp8 (a speed mode, not a file format).
    after = trainable_parameters(model)
    assert set(after) == names_before and all(after[n] is biases[n] for n in after)
    assert not any(t.dtype == E4M3 for t in model.state_dict().values())


def test_swapped_model_trains_its_biases_and_stays_close():
    model = _tiny_difffit()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # adaLN-Zero init would hide the blocks' matmuls
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 9])
    ref = model(x, t, y)
    quantize_frozen_linears(model, kernel=False)
    out = model(x, t, y).float()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    out.square().mean().backward()
    grads = {n: p.grad for n, p in trainable_parameters(model).items()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["blocks.0.attn.qkv.bias"].abs().sum() > 0


def test_full_fine_tuning_has_nothing_to_quantize():
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, hidden_size=64, depth=1, num_heads=4, num_classes=10))
    prepare_model(model, "full")
    assert quantize_frozen_linears(model) == 0


def test_clear_error_without_fp8_tensor_cores():
    assert "needs an NVIDIA GPU with FP8" in fp8_support("cpu")
    with pytest.raises(DiffFitError, match="fp8"):
        require_fp8("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (sm89+ for the kernel)")
def test_cuda_kernel_matches_reference():
    if fp8_support("cuda") is not None:
        pytest.skip(fp8_support("cuda"))
    linear = _frozen_linear().cuda()
    fast, slow = FP8FrozenLinear(linear, kernel=True), FP8FrozenLinear(linear, kernel=False)
    x = torch.randn(64, 64, device="cuda")
    torch.testing.assert_close(fast(x).float(), slow(x).float(), rtol=2e-2, atol=2e-2)


def test_fp8_fit_on_dit_previews_and_writes_plain_files(tmp_path, toy_data, tiny_base_file, tiny_vae_dir, monkeypatch):
    """fit end to end under fp8 (this CPU declared fp8-capable, the dequantizing matmul): the step-0 preview
    samples the quantized model under bf16 autocast, and the adapter holds no float8."""
    import functools

    from safetensors.torch import load_file

    from difffit.engine import devices
    from difffit.engine.training import setup as fit_setup
    from difffit.engine.training import train
    from difffit.engine.training.config import FitConfig

    monkeypatch.setattr(devices, "fp8_support", lambda device: None)
    monkeypatch.setattr(fit_setup, "quantize_frozen_linears", functools.partial(quantize_frozen_linears, kernel=False))
    config = FitConfig(
        data=str(toy_data),
        base=str(tiny_base_file),
        vae=str(tiny_vae_dir),
        steps=2,
        batch_size=4,
        sample_every=2,
        save_every=0,
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
        out=str(tmp_path / "run"),
        adapter_dtype="fp32",
        mixed_precision="fp8",
    )
    result = train.fit(config, progress=False)
    assert (result.out_dir / "samples" / "step-0000000.png").is_file()
    assert (result.out_dir / "samples" / "step-0000002.png").is_file()
    tensors = load_file(str(result.adapter))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
