"""The paper's baselines beside DiffFit: LoRA (built on Hugging Face peft), bottleneck adapters, VPT-deep.

Each adds modules to the model; `add_method_modules` is the one place they are added, used both when a
run prepares its model and when an adapter file is applied to a loaded base (which passes a `setter`
that remembers every replaced attribute, so the base can be restored exactly afterwards).

Defaults and where they come from (README "Methods" has the whole list):
- LoRA rank 8 (the paper's LoRA-R8; R16 is `--rank 16`); alpha = rank, i.e. scale alpha / r = 1 at any
  rank (peft's own defaults are r=8, alpha=8, the same scale); targets attn qkv + proj. The paper's
  Table 1 counts for LoRA-R8/R16 match qkv alone (`--lora-targets qkv`).
- Adapters: bottleneck width 64 (with it the adapters' count matches the paper's 4.28M on DiT-XL/2),
  ReLU, scale 0.1, zero up-projection: AdaptFormer's defaults (Chen et al. 2022).
- VPT-deep: 8 tokens per block, initialised N(0, 0.02) like DiT's class table; the paper gives neither.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import torch
from torch import nn

from difffit.engine.errors import DiffFitError
from difffit.engine.methods.lora_targets import check_any_family, parse_lora_targets, split_targets
from difffit.engine.models.dit import Bottleneck, DiT
from difffit.engine.models.families import family_of
from difffit.engine.models.families.dit import DIT
from difffit.engine.models.family import Family, Setter

ADAPTER_PLACEMENTS = {"adapter-parallel": "parallel", "adapter-sequential": "sequential"}
ADAPTER_SCALE = 0.1  # AdaptFormer's fixed scale
PROMPT_INIT_STD = 0.02
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

    def for_method(self, method: str, family: Family = DIT) -> dict:
        """The settings `method` uses on `family`'s models, as stored in adapter files and shown by `info`."""
        if method == "difffit":
            return {"gamma_placement": self.gamma_placement}
        if method == "lora":
            return {"rank": self.rank, "lora_alpha": self.alpha,
                    "lora_targets": list(parse_lora_targets(self.lora_targets, family.lora))}
        if method in ADAPTER_PLACEMENTS:
            return {"adapter_dim": self.adapter_dim, "adapter_scale": ADAPTER_SCALE}
        if method == "vpt-deep":
            return {"prompt_tokens": self.prompt_tokens}
        return {}

    @classmethod
    def from_dict(cls, values: dict | None) -> MethodSettings:
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

    def check_fits(self, method: str, model: nn.Module) -> None:
        """Refuse sizes the model cannot use, before the method's modules are allocated (a rank of 100,000
        would take gigabytes and train nothing a full-rank update does not). `model` may be on the meta device."""
        family = family_of(model)
        name = family.architecture(family.config_of(model))
        if method == "lora":
            targets = parse_lora_targets(self.lora_targets, family.lora)
            layers = [(target, model.get_submodule(name)) for target, name in lora_target_names(model, targets, family)]
            target, layer = min(layers, key=lambda pair: min(pair[1].in_features, pair[1].out_features))
            limit = min(layer.in_features, layer.out_features)
            if self.rank > limit:
                raise DiffFitError(f"--rank {self.rank} is above {limit}, the smaller dimension of the {target} "
                                   f"layers of {name}; a LoRA rank can be at most that.")
        # The adapters and prompts are DiT's methods (check_method refuses them on other families).
        if method in ADAPTER_PLACEMENTS and self.adapter_dim > model.config.hidden_size:
            raise DiffFitError(f"--adapter-dim {self.adapter_dim} is above the width of {name} "
                               f"({model.config.hidden_size}); a bottleneck adapter can be at most as wide as the "
                               "layer it adapts.")
        if method == "vpt-deep" and self.prompt_tokens > (tokens := model.pos_embed.shape[1]):  # image tokens
            raise DiffFitError(f"--prompt-tokens {self.prompt_tokens} is above the {tokens} image tokens of {name} "
                               f"at latent size {model.config.input_size}; use at most {tokens}.")


# ---------------------------------------------------------------------------------------------
# LoRA, on peft
# ---------------------------------------------------------------------------------------------


def lora_config(settings: MethodSettings, modules_to_save: list[str] | None = None, family: Family = DIT):
    """The peft LoraConfig: B starts at zero (an untrained LoRA adds exactly 0), no dropout (the paper
    states none), no bias training (the biases stay the base's), targets by a regex over block modules."""
    from peft import LoraConfig

    paths = "|".join(re.escape(path) for t in parse_lora_targets(settings.lora_targets, family.lora)
                     for path in family.lora.targets[t])
    lists = family.block_lists
    blocks = lists[0] if len(lists) == 1 else f"({'|'.join(lists)})"  # FLUX: joint and single blocks
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0, bias="none",
                      init_lora_weights=True, target_modules=rf"{blocks}\.\d+\.({paths})",
                      modules_to_save=modules_to_save)


def lora_target_names(model: nn.Module, targets: tuple[str, ...], family: Family = DIT) -> list[tuple[str, str]]:
    """(short name, module name) of every layer the targets name, in every block that has it (SD3's last block
    has no context output, FLUX's single blocks no to_out)."""
    names = []
    for blocks in family.block_lists:
        for i, block in enumerate(getattr(model, blocks)):
            names += [(t, f"{blocks}.{i}.{path}") for t in targets for path in family.lora.targets[t]
                      if isinstance(_module_at(block, path), nn.Linear)]
    if not names:
        raise DiffFitError(f"--lora-targets {','.join(targets)} names no layer of this {family.title} model.")
    return names


def _module_at(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def add_lora(model: nn.Module, settings: MethodSettings, setter: Setter = setattr) -> None:
    """Wrap the target linears in peft LoRA layers (peft's inject_adapter_in_model, adapter "default")."""
    from peft import inject_adapter_in_model

    family = family_of(model)
    targets = parse_lora_targets(settings.lora_targets, family.lora)
    for _, name in lora_target_names(model, targets, family):
        parent, leaf = name.rsplit(".", 1)
        owner = model.get_submodule(parent)
        setter(owner, leaf, getattr(owner, leaf))  # lets a setter that remembers put the plain linear back
    inject_adapter_in_model(lora_config(settings, family=family), model)
    # The model keeps peft's layers only; the settings live in the adapter file (and a second
    # injection after a swap would otherwise see a stale config).
    del model.peft_config


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


@torch.no_grad()
def fold_lora(model: nn.Module, setter: Setter = setattr) -> None:
    """W <- W + (alpha / r) B A in every LoRA layer (peft's merge), then put the plain linears back.

    peft merges in place, so it merges into a float32 copy of W, rounded once to W's dtype: the base's own
    tensor is left as it was, and a `setter` that remembers (AdapterSwapper's) can put it back."""
    for name, module in lora_layers(model):
        linear = module.get_base_layer()
        weight = linear.weight
        setter(linear, "weight", nn.Parameter(weight.detach().to(torch.float32, copy=True), weight.requires_grad))
        module.merge()
        linear.weight = nn.Parameter(linear.weight.to(weight.dtype), weight.requires_grad)
        parent, leaf = name.rsplit(".", 1)
        setter(model.get_submodule(parent), leaf, linear)


# ---------------------------------------------------------------------------------------------
# Adapters and prompts
# ---------------------------------------------------------------------------------------------


def add_adapters(model: DiT, method: str, dim: int, setter: Setter = setattr) -> None:
    like = model.blocks[0].attn.proj.weight
    for block in model.blocks:
        adapter = Bottleneck(like.shape[0], dim, ADAPTER_SCALE, ADAPTER_PLACEMENTS[method])
        setter(block, "adapter", adapter.to(like.device, like.dtype))


def add_prompts(model: DiT, tokens: int, setter: Setter = setattr) -> None:
    like = model.blocks[0].attn.proj.weight
    for block in model.blocks:
        prompts = torch.randn(tokens, like.shape[0], device=like.device, dtype=like.dtype) * PROMPT_INIT_STD
        setter(block, "prompts", nn.Parameter(prompts) if tokens else None)


def add_method_modules(model: nn.Module, method: str, settings: MethodSettings, setter: Setter = setattr) -> None:
    """Add what `method` adds beyond DiffFit's gamma (which `methods.prepare_model` places)."""
    if method == "lora":
        add_lora(model, settings, setter)
    elif method in ADAPTER_PLACEMENTS:
        add_adapters(model, method, settings.adapter_dim, setter)
    elif method == "vpt-deep":
        add_prompts(model, settings.prompt_tokens, setter)
