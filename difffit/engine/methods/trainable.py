"""The fine-tuning methods: preparing a model for one, counting what it trains, the paper's numbers.

Which parameters a method trains, where DiffFit's scale factors gamma go and how they fold away is each
family's rule (engine/models/families: DiT's, PixArt's); this module applies it to any model:
- `difffit` (the paper's method): biases but the timestep embedder's, the conditioning tables (DiT's
  class table, PixArt's modulation tables), affine norm parameters, and gamma (ones) on the branches of
  the chosen blocks.
- `bitfit` (baseline): every bias (and DiT's class table when the classes are new).
- `full` (baseline): every parameter (DiT: but the fixed sin-cos `pos_embed`).
- `lora`, `adapter-parallel`, `adapter-sequential`, `vpt-deep` (baselines, engine/methods/baselines.py): only
  what they add (LoRA A/B, the adapters, the prompts), plus DiT's class table when the classes are new.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from difffit.engine.errors import DiffFitError, require_at_least, require_at_most
from difffit.engine.methods.baselines import add_method_modules, check_fits
from difffit.engine.methods.settings import MethodSettings
from difffit.engine.models.dit import DiTConfig
from difffit.engine.models.families import family_of
from difffit.engine.models.families.dit import CLASS_TABLE, DIT, fold_scale_factors, resize_class_table
from difffit.engine.models.family import ADDED_GROUPS, METHODS, Family, added_reference, norm_parameter_names

MAX_CLASSES = 1_000_000  # ImageNet-21k has 21,841; a table of a million rows is gigabytes at DiT-XL width
FOLDABLE = ("full", "bitfit", "lora", "difffit")  # the rest add computation that no weight can absorb
# Importable from here too, beside the method code that uses them: the DiT family's pieces and the family-generic
# name rules.
__all__ = [
    "CLASS_TABLE",
    "METHODS",
    "added_reference",
    "fold_scale_factors",
    "norm_parameter_names",
    "resize_class_table",
]

# Trainable parameters (millions) on DiT-XL/2 as the DiffFit paper reports them: Xie et al. 2023 (ICCV),
# Table 1, "Params (M)" column (101-class Food-101 table included). LoRA is keyed by rank (R8, R16).
PAPER_TRAINABLE_M: dict[str, float | dict[int, float]] = {
    "full": 673.8,
    "adapter-parallel": 4.28,
    "adapter-sequential": 4.28,
    "bitfit": 0.61,
    "vpt-deep": 2.81,
    "lora": {8: 1.15, 16: 2.18},
    "difffit": 0.83,
}
IMAGENET_WNID = re.compile(r"n\d{8}")


def parse_gamma_blocks(spec: str | None, depth: int) -> list[int]:
    """'half' (default: the first half, the paper's best placement), 'all', 'none', or '0-5,20'."""
    text = (spec or "half").strip().lower()
    if text == "half":
        return list(range(depth // 2))
    if text == "all":
        return list(range(depth))
    if text in ("none", ""):
        return []
    blocks: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            lo, hi = int(first), int(last or first)
            if lo > hi:
                raise ValueError
            blocks.update(range(lo, hi + 1))
    except ValueError:
        raise DiffFitError(
            f"Cannot read --gamma-blocks {spec!r}; use 'half', 'all', 'none' or ranges like '0-5,20'."
        ) from None
    if bad := [i for i in blocks if not 0 <= i < depth]:
        raise DiffFitError(f"--gamma-blocks names block {max(bad)}, but the model has blocks 0-{depth - 1}.")
    return sorted(blocks)


def prepare_model(
    model: nn.Module,
    method: str = "difffit",
    gamma_blocks: list[int] | None = None,
    num_classes: int | None = None,
    new_classes: bool = False,
    settings: MethodSettings | None = None,
) -> None:
    """Shape `model` for `method` and set requires_grad, as its family says: gamma for difffit, the
    modules a baseline adds (`settings`), a new class table if needed (class-conditional families).

    DiT's class table is replaced when `num_classes` differs from the base's, or when `new_classes` is
    set (same count, different classes); otherwise the base's table is kept (and fine-tuned by difffit).
    `gamma_blocks` defaults to the first half of the blocks (difffit only).
    """
    family = family_of(model)
    check_method(method, family)
    settings = (settings or MethodSettings()).validate(family)
    check_fits(settings, method, model)
    if num_classes is not None:
        require_at_least("--num-classes", num_classes, 1)
        require_at_most("--num-classes", num_classes, MAX_CLASSES, "a class table holds a row per class")
    new_classes = family.prepare_conditioning(model, num_classes, new_classes)
    if method == "difffit":
        if gamma_blocks is None:
            gamma_blocks = parse_gamma_blocks(None, family.depth(model))
        family.add_gamma(model, gamma_blocks, settings.gamma_placement)
    add_method_modules(model, method, settings)
    norm_names = norm_parameter_names(model)
    for name, param in model.named_parameters():
        param.requires_grad_(family.is_trainable(name, method, new_classes, norm_names))


def check_method(method: str, family: Family) -> None:
    """A method `family` supports, or the one sentence saying which ones it does."""
    if method not in METHODS:
        raise DiffFitError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if method not in family.methods:
        raise DiffFitError(
            f"--method {method} is not available on {family.title} bases; they support {', '.join(family.methods)}."
        )


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def count_groups(model: nn.Module, trainable_only: bool = True) -> dict[str, int]:
    """Parameter counts per group of the model's family (DiT: biases, gamma, class_table, norms, lora,
    adapters, prompts, other; PixArt: modulation instead of class_table and the DiT-only modules)."""
    family = family_of(model)
    norm_names = norm_parameter_names(model)
    counts = dict.fromkeys(family.groups, 0)
    for name, param in model.named_parameters():
        if param.requires_grad or not trainable_only:
            counts[family.parameter_group(name, norm_names)] += param.numel()
    return counts


def total_parameters(model: nn.Module) -> int:
    """Every parameter, `pos_embed` included (the reference's convention: DiT-XL/2 = 675,129,632)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def cast_frozen_matrices(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen Linear / Conv2d weights in `dtype` (bf16 or fp16) for autocast training.

    Autocast would cast each of them to `dtype` on every forward and keep the copy for backward;
    stored pre-cast they give bit-identical matmuls with no cast kernels and half the memory.
    Trainable tensors stay fp32 (the optimizer's master weights); embeddings and pos_embed are not
    autocast ops, so they keep their dtype too. Returns the number of values cast.
    """
    cast = 0
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d) and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(dtype)
            cast += module.weight.numel()
    return cast


def paper_trainable_params(architecture: str, method: str, settings: MethodSettings) -> int | None:
    """The paper's Table 1 count for `method` (DiT-XL/2 only; LoRA at ranks 8 and 16 only)."""
    value = PAPER_TRAINABLE_M.get(method) if architecture == "DiT-XL/2" else None
    if isinstance(value, dict):
        value = value.get(settings.rank)
    return None if value is None else round(value * 1e6)


def describe_method(
    config: DiTConfig | dict,
    method: str = "difffit",
    *,
    num_classes: int | None = None,
    gamma_blocks: str | list[int] | None = None,
    new_classes: bool = False,
    settings: MethodSettings | None = None,
    family: Family = DIT,
) -> dict:
    """What `method` would train on a `family` model of `config` (a DiTConfig, or any family's config
    dict), counted on a meta-device model (no memory).

    Percentages are of the adapted model (new class table and added modules included).
    """
    settings = settings or MethodSettings()
    config = config.to_dict() if isinstance(config, DiTConfig) else dict(config)
    with torch.device("meta"):
        model = family.empty_model(config)
        if method == "difffit" and not isinstance(gamma_blocks, list):
            gamma_blocks = parse_gamma_blocks(gamma_blocks, family.depth(model))
        prepare_model(
            model, method, gamma_blocks if method == "difffit" else None, num_classes, new_classes, settings=settings
        )
    groups = count_groups(model)
    total = total_parameters(model)
    trainable = sum(groups.values())
    classes = {}
    if family.class_table:  # the class table the adapted model has, and whether it is new
        classes = {
            "num_classes": model.config.num_classes,
            "new_class_table": model.config.num_classes != config["num_classes"] or new_classes,
        }
    return {
        "method": method,
        "settings": settings.for_method(method, family),
        "paper_trainable_params": paper_trainable_params(family.architecture(config), method, settings),
        "gamma_blocks": family.gamma_blocks(model),
        **classes,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        # The added-module groups only where the method has them (info's table stays short).
        "trainable_groups": {g: n for g, n in groups.items() if n or g not in ADDED_GROUPS},
    }


def same_classes(folder_names: list[str], base_num_classes: int, base_names: list[str] | None) -> bool:
    """Whether a dataset has the base's classes, so the base's class table is kept (not re-initialised).

    Same count, and the same names, or no names on the base, or ImageNet's sorted wnid folders
    (n01440764, ...) against a 1000-class base: their sorted order is the standard class order.
    """
    if len(folder_names) != base_num_classes:
        return False
    if base_names is None or list(base_names) == list(folder_names):
        return True
    return base_num_classes == 1000 and all(IMAGENET_WNID.fullmatch(name) for name in folder_names)
