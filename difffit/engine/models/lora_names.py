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
DIT_LORA = LoraNames(
    "DiT",
    {
        "qkv": ("attn.qkv",),
        "proj": ("attn.proj",),
        "fc1": ("mlp.fc1",),
        "fc2": ("mlp.fc2",),
        "adaLN": ("adaLN_modulation.1",),
    },
    {"attn": ("qkv", "proj"), "mlp": ("fc1", "fc2")},
    ("qkv", "proj"),
)
# PixArt (diffusers' names): a name covers both attentions, self and cross, as diffusers' scripts target them.
PIXART_LORA = LoraNames(
    "PixArt",
    {
        "to_q": ("attn1.to_q", "attn2.to_q"),
        "to_k": ("attn1.to_k", "attn2.to_k"),
        "to_v": ("attn1.to_v", "attn2.to_v"),
        "to_out.0": ("attn1.to_out.0", "attn2.to_out.0"),
        "ff.net.0.proj": ("ff.net.0.proj",),
        "ff.net.2": ("ff.net.2",),
    },
    {"attn": ("to_q", "to_k", "to_v", "to_out.0"), "mlp": ("ff.net.0.proj", "ff.net.2")},
    ("to_q", "to_k", "to_v", "to_out.0"),
)

# SD3 and FLUX (diffusers' names): the joint blocks' attention of both streams (to_* for the image, add_*_proj
# and to_add_out for the text), SD3.5's second image attention under the same names, and the MLPs of both
# streams; FLUX's single blocks add their fused MLP input and output. The default, the attention projections
# of both streams, is what diffusers' SD3 LoRA script targets.
_JOINT = {
    "to_q": ("attn.to_q", "attn2.to_q"),
    "to_k": ("attn.to_k", "attn2.to_k"),
    "to_v": ("attn.to_v", "attn2.to_v"),
    "to_out.0": ("attn.to_out.0", "attn2.to_out.0"),
    "add_q_proj": ("attn.add_q_proj",),
    "add_k_proj": ("attn.add_k_proj",),
    "add_v_proj": ("attn.add_v_proj",),
    "to_add_out": ("attn.to_add_out",),
    "ff.net.0.proj": ("ff.net.0.proj",),
    "ff.net.2": ("ff.net.2",),
    "ff_context.net.0.proj": ("ff_context.net.0.proj",),
    "ff_context.net.2": ("ff_context.net.2",),
}
_JOINT_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_JOINT_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
SD3_LORA = LoraNames("SD3", _JOINT, {"attn": _JOINT_ATTENTION, "mlp": _JOINT_MLP}, _JOINT_ATTENTION)
FLUX_LORA = LoraNames(
    "FLUX",
    {**_JOINT, "proj_mlp": ("proj_mlp",), "proj_out": ("proj_out",)},
    {"attn": _JOINT_ATTENTION, "mlp": (*_JOINT_MLP, "proj_mlp", "proj_out")},
    _JOINT_ATTENTION,
)
