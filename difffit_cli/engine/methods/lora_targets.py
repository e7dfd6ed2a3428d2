"""The layer names `--lora-targets` accepts, and their parser.

Apart from `baselines` (torch, peft) so that the command line's help lists exactly these names without
importing torch: the help is built from them and cannot drift from what is accepted.
"""

from __future__ import annotations

from difffit_cli.engine.errors import DiffFitError

# Short name -> the module path inside a block (original layout).
LORA_TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
                "adaLN": "adaLN_modulation.1"}
LORA_GROUPS = {"attn": ("qkv", "proj"), "mlp": ("fc1", "fc2")}  # one name for a branch's two linears
DEFAULT_LORA_TARGETS = LORA_GROUPS["attn"]


def describe_lora_targets() -> str:
    """The accepted names in words, e.g. for --help: 'qkv, proj, fc1, fc2, adaLN; attn = qkv,proj; ...'."""
    groups = "; ".join(f"{group} = {','.join(names)}" for group, names in LORA_GROUPS.items())
    return f"{', '.join(LORA_TARGETS)}; {groups}"


def parse_lora_targets(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """'qkv,proj' (the default), or any comma-separated names of `describe_lora_targets()`."""
    if spec is None:
        return DEFAULT_LORA_TARGETS
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    names = [name for part in parts for name in LORA_GROUPS.get(part, [part])]
    if bad := [n for n in names if n not in LORA_TARGETS]:
        raise DiffFitError(f"Unknown --lora-targets entry {bad[0]!r}; use {describe_lora_targets()}.")
    if not names:
        raise DiffFitError(f"--lora-targets is empty; name at least one of {describe_lora_targets()}.")
    return tuple(dict.fromkeys(names))
