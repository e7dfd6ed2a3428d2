"""The fine-tuning methods: which parameters train, where DiffFit's scale factors go, folding them away.

- `difffit` (the paper's method): every bias except the timestep embedder's (the paper freezes that
  embedder), the class table, affine norm parameters if the model has any, and scale factors gamma
  (ones) on the attention and MLP branches of the chosen blocks.
- `bitfit` (baseline): every bias, plus the class table when the classes are new.
- `full` (baseline): every parameter except the fixed sin-cos `pos_embed`.
- `lora`, `adapter-parallel`, `adapter-sequential`, `vpt-deep` (baselines, engine/methods/baselines.py): only
  what they add (LoRA A/B, the adapters, the prompts), plus the class table when the classes are new.

New classes: a dataset with K classes gets a (K+1)-row table. Every row, the null row K included,
starts as a copy of the base's null row, so an untrained adapter samples the base's unconditional
distribution and guidance keeps its pre-trained reference point; training pulls the class rows apart.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
from torch import nn

from difffit_cli.engine.errors import DiffFitError, require_at_least
from difffit_cli.engine.methods.baselines import MethodSettings, add_method_modules
from difffit_cli.engine.models.dit import DiT, DiTConfig

# Every method, in the paper's Table 1 order (benchmarks and examples/table1.py iterate over it).
METHODS = ("full", "adapter-parallel", "adapter-sequential", "bitfit", "vpt-deep", "lora", "difffit")
FOLDABLE = ("full", "bitfit", "lora", "difffit")  # the rest add computation that no weight can absorb
CLASS_TABLE = "y_embedder.embedding_table.weight"
GROUPS = ("biases", "gamma", "class_table", "norms", "lora", "adapters", "prompts", "other")
ADDED_GROUPS = ("lora", "adapters", "prompts")
# Tensors a method adds (rather than changes), by name, and the value they have in the base model.
ADDED = {".gamma_": 1.0, ".lora_A.": 0.0, ".lora_B.": 0.0, ".adapter.": 0.0, ".prompts": 0.0}

# Trainable parameters (millions) on DiT-XL/2 as the DiffFit paper reports them: Xie et al. 2023 (ICCV),
# Table 1, "Params (M)" column (101-class Food-101 table included). LoRA is keyed by rank (R8, R16).
PAPER_TRAINABLE_M: dict[str, float | dict[int, float]] = {
    "full": 673.8, "adapter-parallel": 4.28, "adapter-sequential": 4.28, "bitfit": 0.61, "vpt-deep": 2.81,
    "lora": {8: 1.15, 16: 2.18}, "difffit": 0.83,
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


def resize_class_table(model: DiT, num_classes: int) -> None:
    """Give the model a fresh (num_classes + 1)-row table, every row a copy of the base's null row."""
    old = model.y_embedder.embedding_table.weight
    null_row = old[model.config.num_classes].detach()
    table = null_row.expand(num_classes + 1, -1).clone()
    model.y_embedder.embedding_table.weight = nn.Parameter(table, requires_grad=old.requires_grad)
    model.y_embedder.embedding_table.num_embeddings = num_classes + 1
    model.y_embedder.num_classes = num_classes
    model.config = replace(model.config, num_classes=num_classes)


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Names of affine norm parameters (stock DiT has none; a model that adds them gets them trained)."""
    return {
        f"{module_name}.{param_name}"
        for module_name, module in model.named_modules()
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm))
        for param_name, _ in module.named_parameters(recurse=False)
    }


def added_reference(name: str) -> float | None:
    """The base value of a tensor a method adds (1 for gamma, 0 for LoRA, adapters, prompts); None for
    the base's own tensors."""
    return next((value for key, value in ADDED.items() if key in name), None)


def is_trainable(name: str, method: str, new_classes: bool, norm_names: set[str]) -> bool:
    """The per-method rule, on original-layout parameter names."""
    if method == "full":
        return name != "pos_embed"
    is_bias = name.endswith(".bias")
    new_table = new_classes and name == CLASS_TABLE
    if method == "bitfit":
        return is_bias or new_table
    if method != "difffit":  # the baselines that add modules: those train (they add nothing else)
        return new_table or (added_reference(name) is not None and ".gamma_" not in name)
    # difffit
    return (
        (is_bias and not name.startswith("t_embedder."))
        or name == CLASS_TABLE
        or ".gamma_" in name
        or name in norm_names
    )


def prepare_model(
    model: DiT,
    method: str = "difffit",
    gamma_blocks: list[int] | None = None,
    num_classes: int | None = None,
    new_classes: bool = False,
    settings: MethodSettings | None = None,
) -> None:
    """Shape `model` for `method` and set requires_grad: gamma for difffit, the modules a baseline adds
    (`settings`), a new class table if needed.

    The class table is replaced when `num_classes` differs from the base's, or when `new_classes` is
    set (same count, different classes); otherwise the base's table is kept (and fine-tuned by difffit).
    `gamma_blocks` defaults to the first half of the blocks (difffit only).
    """
    if method not in METHODS:
        raise DiffFitError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    settings = (settings or MethodSettings()).validate()
    settings.check_fits(method, model)
    if num_classes is not None:
        require_at_least("--num-classes", num_classes, 1)
    new_classes = new_classes or (num_classes is not None and num_classes != model.config.num_classes)
    if new_classes:
        resize_class_table(model, num_classes if num_classes is not None else model.config.num_classes)
    if method == "difffit":
        if gamma_blocks is None:
            gamma_blocks = parse_gamma_blocks(None, model.config.depth)
        attn = settings.gamma_placement == "branch+attn"
        model.add_scale_factors([i for i in gamma_blocks if i not in model.gamma_blocks], attn=attn)
    add_method_modules(model, method, settings)
    norm_names = norm_parameter_names(model)
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, method, new_classes, norm_names))


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def parameter_group(name: str, norm_names: set[str]) -> str:
    """Which `info` group a parameter belongs to."""
    if name == CLASS_TABLE:
        return "class_table"
    if ".gamma_" in name:
        return "gamma"
    if name in norm_names:
        return "norms"
    if ".lora_" in name:
        return "lora"
    if ".adapter." in name:
        return "adapters"
    if name.endswith(".prompts"):
        return "prompts"
    if name.endswith(".bias"):
        return "biases"
    return "other"


def count_groups(model: nn.Module, trainable_only: bool = True) -> dict[str, int]:
    """Parameter counts per group (biases, gamma, class_table, norms, lora, adapters, prompts, other)."""
    norm_names = norm_parameter_names(model)
    counts = dict.fromkeys(GROUPS, 0)
    for name, param in model.named_parameters():
        if param.requires_grad or not trainable_only:
            counts[parameter_group(name, norm_names)] += param.numel()
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


@torch.no_grad()
def fold_scale_factors(model: DiT) -> None:
    """Fold gamma into the branch outputs: gamma * (W x + b) = (gamma W) x + gamma b; then drop gamma.

    gamma scales output features, i.e. the rows of attn.proj / mlp.fc2 weights and their biases (and
    of attn.qkv for the branch+attn placement, whose gamma_proj folds into attn.proj with gamma_attn).
    """
    for block in model.blocks:
        pairs = ((block.gamma_attn, block.attn.proj), (block.gamma_mlp, block.mlp.fc2),
                 (block.attn.gamma_qkv, block.attn.qkv), (block.attn.gamma_proj, block.attn.proj))
        for gamma, linear in pairs:
            if gamma is not None:
                linear.weight.mul_(gamma.to(linear.weight.dtype)[:, None])
                linear.bias.mul_(gamma.to(linear.bias.dtype))
        block.remove_scale_factors()


def paper_trainable_params(config: DiTConfig, method: str, settings: MethodSettings) -> int | None:
    """The paper's Table 1 count for `method` (DiT-XL/2 only; LoRA at ranks 8 and 16 only)."""
    value = PAPER_TRAINABLE_M.get(method) if config.name == "DiT-XL/2" else None
    if isinstance(value, dict):
        value = value.get(settings.rank)
    return None if value is None else round(value * 1e6)


def describe_method(config: DiTConfig, method: str = "difffit", *, num_classes: int | None = None,
                    gamma_blocks: str | list[int] | None = None, new_classes: bool = False,
                    settings: MethodSettings | None = None) -> dict:
    """What `method` would train on a model of `config`, counted on a meta-device model (no memory).

    Percentages are of the adapted model (new class table and added modules included).
    """
    settings = settings or MethodSettings()
    with torch.device("meta"):
        model = DiT(config)
        if method == "difffit" and not isinstance(gamma_blocks, list):
            gamma_blocks = parse_gamma_blocks(gamma_blocks, config.depth)
        prepare_model(model, method, gamma_blocks if method == "difffit" else None, num_classes, new_classes,
                      settings=settings)
    groups = count_groups(model)
    total = total_parameters(model)
    trainable = sum(groups.values())
    return {
        "method": method,
        "settings": settings.for_method(method),
        "paper_trainable_params": paper_trainable_params(config, method, settings),
        "gamma_blocks": model.gamma_blocks,
        "num_classes": model.config.num_classes,
        "new_class_table": model.y_embedder.num_classes != config.num_classes or new_classes,
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
