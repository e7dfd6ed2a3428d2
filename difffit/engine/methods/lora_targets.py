"""The parser of `--lora-targets`, over the names each family accepts (`engine.models.lora_names`, which
the command line's help is built from, so it cannot drift from what is accepted); DiT's are the default
everywhere a family is not known yet. Apart from `baselines` (torch, peft): parsing needs no torch.
"""

from __future__ import annotations

from difffit.engine.errors import DiffFitError
from difffit.engine.models.lora_names import DIT_LORA, FLUX_LORA, PIXART_LORA, SD3_LORA, LoraNames

EVERY_FAMILY = (DIT_LORA, PIXART_LORA, SD3_LORA, FLUX_LORA)


def split_targets(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip())


def parse_lora_targets(spec: str | list[str] | tuple[str, ...] | None, names: LoraNames = DIT_LORA) -> tuple[str, ...]:
    """Comma-separated names of `names` (a family's: DiT's by default), groups expanded; None: its default."""
    if spec is None:
        return names.default
    parsed = [name for part in split_targets(spec) for name in names.groups.get(part, [part])]
    if bad := [n for n in parsed if n not in names.targets]:
        raise DiffFitError(f"Unknown --lora-targets entry {bad[0]!r} for {names.title}; use {names.describe()}.")
    if not parsed:
        raise DiffFitError(f"--lora-targets is empty; name at least one of {names.describe()}.")
    return tuple(dict.fromkeys(parsed))


def check_any_family(spec: tuple[str, ...] | None) -> None:
    """Refuse a name no family accepts (before the base, and so its family, is known)."""
    known = {name for names in EVERY_FAMILY for name in (*names.targets, *names.groups)}
    if spec is not None and (bad := [n for n in spec if n not in known]):
        raise DiffFitError(
            f"Unknown --lora-targets entry {bad[0]!r}; use "
            f"{'; or '.join(f'{n.title}: {n.describe()}' for n in EVERY_FAMILY)}."
        )
