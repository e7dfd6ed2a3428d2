"""The paper's baselines beside DiffFit: LoRA (built on Hugging Face peft), bottleneck adapters, VPT-deep.

Each adds modules to the model; `add_method_modules` is the one place they are added, used both when a
run prepares its model and when an adapter file is applied to a loaded base (which passes a `setter`
that remembers every replaced attribute, so the base can be restored exactly afterwards). Their settings
and defaults, and where those come from, are `engine/methods/settings.py`'s MethodSettings.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from difffit.engine.errors import DiffFitError
from difffit.engine.methods.lora_targets import parse_lora_targets
from difffit.engine.methods.settings import ADAPTER_PLACEMENTS, ADAPTER_SCALE, MethodSettings
from difffit.engine.models.dit import Bottleneck, DiT
from difffit.engine.models.families import family_of
from difffit.engine.models.families.dit import DIT
from difffit.engine.models.family import Family, Setter

PROMPT_INIT_STD = 0.02


def check_fits(settings: MethodSettings, method: str, model: nn.Module) -> None:
    """Refuse sizes the model cannot use, before the method's modules are allocated (a rank of 100,000
    would take gigabytes and train nothing a full-rank update does not). `model` may be on the meta device."""
    family = family_of(model)
    name = family.architecture(family.config_of(model))
    if method == "lora":
        targets = parse_lora_targets(settings.lora_targets, family.lora)
        layers = [(target, model.get_submodule(name)) for target, name in lora_target_names(model, targets, family)]
        target, layer = min(layers, key=lambda pair: min(pair[1].in_features, pair[1].out_features))
        limit = min(layer.in_features, layer.out_features)
        if settings.rank > limit:
            raise DiffFitError(
                f"--rank {settings.rank} is above {limit}, the smaller dimension of the {target} "
                f"layers of {name}; a LoRA rank can be at most that."
            )
    # The adapters and prompts are DiT's methods (check_method refuses them on other families).
    if method in ADAPTER_PLACEMENTS and settings.adapter_dim > model.config.hidden_size:
        raise DiffFitError(
            f"--adapter-dim {settings.adapter_dim} is above the width of {name} "
            f"({model.config.hidden_size}); a bottleneck adapter can be at most as wide as the "
            "layer it adapts."
        )
    if method == "vpt-deep" and settings.prompt_tokens > (tokens := model.pos_embed.shape[1]):  # image tokens
        raise DiffFitError(
            f"--prompt-tokens {settings.prompt_tokens} is above the {tokens} image tokens of {name} "
            f"at latent size {model.config.input_size}; use at most {tokens}."
        )


# ---------------------------------------------------------------------------------------------
# LoRA, on peft
# ---------------------------------------------------------------------------------------------


def lora_config(settings: MethodSettings, modules_to_save: list[str] | None = None, family: Family = DIT):
    """The peft LoraConfig: B starts at zero (an untrained LoRA adds exactly 0), no dropout (the paper
    states none), no bias training (the biases stay the base's), targets by a regex over block modules."""
    from peft import LoraConfig

    paths = "|".join(
        re.escape(path)
        for t in parse_lora_targets(settings.lora_targets, family.lora)
        for path in family.lora.targets[t]
    )
    lists = family.block_lists
    blocks = lists[0] if len(lists) == 1 else f"({'|'.join(lists)})"  # FLUX: joint and single blocks
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
        target_modules=rf"{blocks}\.\d+\.({paths})",
        modules_to_save=modules_to_save,
    )


def lora_target_names(model: nn.Module, targets: tuple[str, ...], family: Family = DIT) -> list[tuple[str, str]]:
    """(short name, module name) of every layer the targets name, in every block that has it (SD3's last block
    has no context output, FLUX's single blocks no to_out)."""
    names = []
    for blocks in family.block_lists:
        for i, block in enumerate(getattr(model, blocks)):
            names += [
                (t, f"{blocks}.{i}.{path}")
                for t in targets
                for path in family.lora.targets[t]
                if isinstance(_module_at(block, path), nn.Linear)
            ]
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
