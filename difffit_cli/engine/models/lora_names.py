"""The layer names `--lora-targets` accepts, per model family: plain data, no torch, so that the command
line's help lists exactly what is accepted without importing torch (engine/methods/lora_targets.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoraNames:
    """One family's --lora-targets vocabulary."""

    title: str
    targets: dict[str, tuple[str, ...]]  # short name -> the module paths inside a block it names
    groups: dict[str, tuple[str, ...]]  # one name for several short names (a branch's linears)
    default: tuple[str, ...]

    def describe(self) -> str:
        """The names in words, e.g. 'qkv, proj, fc1, fc2, adaLN; attn = qkv,proj; mlp = fc1,fc2'."""
        groups = "; ".join(f"{group} = {','.join(names)}" for group, names in self.groups.items())
        return f"{', '.join(self.targets)}; {groups}"


# DiT, in the original layout.
DIT_LORA = LoraNames("DiT", {"qkv": ("attn.qkv",), "proj": ("attn.proj",), "fc1": ("mlp.fc1",),
                             "fc2": ("mlp.fc2",), "adaLN": ("adaLN_modulation.1",)},
                     {"attn": ("qkv", "proj"), "mlp": ("fc1", "fc2")}, ("qkv", "proj"))
# PixArt (diffusers' names): a name covers both attentions, self and cross, as diffusers' scripts target them.
PIXART_LORA = LoraNames("PixArt", {"to_q": ("attn1.to_q", "attn2.to_q"), "to_k": ("attn1.to_k", "attn2.to_k"),
                                   "to_v": ("attn1.to_v", "attn2.to_v"),
                                   "to_out.0": ("attn1.to_out.0", "attn2.to_out.0"),
                                   "ff.net.0.proj": ("ff.net.0.proj",), "ff.net.2": ("ff.net.2",)},
                        {"attn": ("to_q", "to_k", "to_v", "to_out.0"), "mlp": ("ff.net.0.proj", "ff.net.2")},
                        ("to_q", "to_k", "to_v", "to_out.0"))
