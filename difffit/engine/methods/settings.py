"""MethodSettings: the settings of every method and their defaults, in the one place they are written.

Plain data with no torch, so the command line reads the defaults for `fit` and `info` from here without
loading the engine. Where each default comes from:
- LoRA rank 8 (the paper's LoRA-R8; R16 is `--rank 16`); alpha = rank, i.e. scale alpha / r = 1 at any
  rank (peft's own defaults are r=8, alpha=8, the same scale); targets attn qkv + proj. The paper's
  Table 1 counts for LoRA-R8/R16 match qkv alone (`--lora-targets qkv`).
- Adapters: bottleneck width 64 (with it the adapters' count matches the paper's 4.28M on DiT-XL/2),
  ReLU, scale 0.1, zero up-projection: AdaptFormer's defaults (Chen et al. 2022).
- VPT-deep: 8 tokens per block, initialised N(0, 0.02) like DiT's class table; the paper gives neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from difffit.engine.errors import DiffFitError
from difffit.engine.methods.lora_targets import check_any_family, parse_lora_targets, split_targets
from difffit.engine.models.lora_names import DIT_LORA

if TYPE_CHECKING:
    from difffit.engine.models.family import Family

ADAPTER_PLACEMENTS = {"adapter-parallel": "parallel", "adapter-sequential": "sequential"}
ADAPTER_SCALE = 0.1  # AdaptFormer's fixed scale
GAMMA_PLACEMENTS = ("branch", "branch+attn")


@dataclass(frozen=True)
class MethodSettings:
    """The settings of every method; an adapter file records the ones its method uses (`for_method`)."""

    gamma_placement: str = "branch"  # difffit: "branch" (the paper) or "branch+attn" (thuml's re-implementation)
    rank: int = 8  # lora
    lora_alpha: float | None = None  # lora; None = rank
    lora_targets: tuple[str, ...] | None = None  # lora; None: the family's default (DiT: qkv, proj)
    adapter_dim: int = 64  # adapter-parallel / adapter-sequential
    prompt_tokens: int = 8  # vpt-deep

    @property
    def alpha(self) -> float:
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)

    def for_method(self, method: str, family: Family | None = None) -> dict:
        """The settings `method` uses on `family`'s models (DiT's by default), as stored in adapter files and
        shown by `info`."""
        if method == "difffit":
            return {"gamma_placement": self.gamma_placement}
        if method == "lora":
            return {
                "rank": self.rank,
                "lora_alpha": self.alpha,
                "lora_targets": list(parse_lora_targets(self.lora_targets, family.lora if family else DIT_LORA)),
            }
        if method in ADAPTER_PLACEMENTS:
            return {"adapter_dim": self.adapter_dim, "adapter_scale": ADAPTER_SCALE}
        if method == "vpt-deep":
            return {"prompt_tokens": self.prompt_tokens}
        return {}

    @classmethod
    def from_dict(cls, values: dict | None) -> MethodSettings:
        """The settings among `values` (other keys ignored); comma-separated LoRA targets split."""
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in (values or {}).items() if k in known}
        if kept.get("lora_targets") is not None:
            kept["lora_targets"] = split_targets(kept["lora_targets"])
        return cls(**kept)

    def validate(self, family: Family | None = None) -> MethodSettings:
        """Check every setting; the LoRA targets against `family`'s names, or any family's when not known yet."""
        if self.gamma_placement not in GAMMA_PLACEMENTS:
            raise DiffFitError(f"Unknown --gamma-placement {self.gamma_placement!r}; choose branch or branch+attn.")
        for name in ("rank", "adapter_dim"):
            if getattr(self, name) < 1:
                raise DiffFitError(f"--{name.replace('_', '-')} must be 1 or more (got {getattr(self, name)}).")
        if self.prompt_tokens < 0:
            raise DiffFitError(f"--prompt-tokens must be 0 or more (got {self.prompt_tokens}).")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise DiffFitError(f"--lora-alpha must be a positive number (got {self.lora_alpha}).")
        if family is not None:
            parse_lora_targets(self.lora_targets, family.lora)
        else:
            check_any_family(self.lora_targets)
        return self
