"""DiffFit's gamma on a diffusers projection: `ScaledLinear` and its fold, for every diffusers family.

gamma multiplies the output of a branch's last projection (PixArt's `attn1.to_out.0`, ...). It sits in a
Linear subclass that shares the projection's own weight and bias, so parameter names stay diffusers'
(`...to_out.0.weight`, plus `...to_out.0.gamma_`): fingerprints, LoRA targets and state dicts are
unchanged, and an untrained gamma (ones) changes no bit. It folds into that projection
(W' = diag(gamma) W, b' = gamma * b), so a merged model is a stock diffusers model.

Under `--mixed-precision fp8` the projection becomes an `FP8FrozenLinear` that keeps the same `gamma_`
Parameter (engine/models/fp8.py), so anything asking where gamma is asks `has_gamma`, not the class.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class ScaledLinear(nn.Linear):
    """A Linear whose output is multiplied by `gamma_`: the projection's own weight and bias (shared,
    not copied) plus one trainable scale per output feature, ones at the start."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.gamma_ = nn.Parameter(
            torch.ones(linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out * self.gamma_.to(out.dtype)


def has_gamma(module: nn.Module) -> bool:
    """Whether `module` scales its output by a gamma (a ScaledLinear, or its fp8 counterpart)."""
    return isinstance(getattr(module, "gamma_", None), nn.Parameter)


@torch.no_grad()
def fold_scaled_linears(model: nn.Module, setter: Callable[[object, str, object], None] = setattr) -> None:
    """Each ScaledLinear becomes a plain Linear holding gamma W and gamma b, computed in float32 and rounded
    once to W's dtype: new tensors, so a base whose projections an adapter shares is left as it was (and a
    `setter` that remembers can put the ScaledLinear's projection back). Folding needs the projections' real
    weights: a model whose gamma sits on a float8 projection (a training-time speed mode) is refused."""
    for name, module in list(model.named_modules()):
        if has_gamma(module) and not isinstance(module, ScaledLinear):
            raise ValueError(f"{name} holds gamma on a {type(module).__name__}; fold on the base's own weights")
        if isinstance(module, ScaledLinear):
            dtype, gamma = module.weight.dtype, module.gamma_.float()
            folded = torch.nn.utils.skip_init(
                nn.Linear,
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device=module.weight.device,
                dtype=dtype,
            )
            weight = (module.weight.float() * gamma[:, None]).to(dtype)
            folded.weight = nn.Parameter(weight, module.weight.requires_grad)
            if module.bias is not None:
                folded.bias = nn.Parameter((module.bias.float() * gamma).to(dtype), module.bias.requires_grad)
            owner, _, leaf = name.rpartition(".")
            setter(model.get_submodule(owner), leaf, folded)
