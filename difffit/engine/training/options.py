"""FitFields: every option of `difffit fit` and `difffit upscale-res` with its default, the one place a
default is written.

Plain data with no torch: the command line reads its defaults from here without loading the engine, and
FitConfig (engine/training/config.py) adds the checks. Options are flat (flags, recipe keys, the keys of a
run's config.toml); the method settings among them are kept as one MethodSettings, which the methods take.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TypeVar

from difffit.engine.methods.settings import MethodSettings

METHOD_SETTINGS = tuple(f.name for f in dataclasses.fields(MethodSettings))
Fields = TypeVar("Fields", bound="FitFields")


@dataclass
class FitFields:
    """The options of a fit run and their defaults; FitConfig is these, checked.

    None means "decided at run time" (from the base, the method or the data). A `resolution` other
    than the base's moves the base there first (the positional-encoding trick by default).
    """

    data: str | None = None
    base: str | None = None
    vae: str | None = None  # default: the base's VAE
    method: str = "difffit"
    out: str | None = None  # default: runs/<data folder name>-<method>
    steps: int = 24000  # total optimizer steps of the run (a resumed run trains up to this)
    batch_size: int = 32  # global batch per optimizer step (all processes, all accumulation steps)
    lr: float | None = None  # default: 1e-3 for difffit and bitfit, 1e-4 for full
    seed: int = 0
    resolution: int | None = None  # default: the base's resolution
    num_heads: int | None = None  # only for a base of non-standard width that does not record it
    mixed_precision: str = "auto"  # auto = bf16 on CUDA, no on CPU
    device: str = "auto"
    save_every: int = 1000
    sample_every: int = 2000  # 0 = no preview grids
    resume: bool = False
    gamma_blocks: str | None = None  # default: the first half of the blocks
    ema: bool = True
    ema_decay: float = 0.9999
    cache_latents: bool = True
    cache_dir: str | None = None
    grad_checkpointing: bool = False
    compile: str = "auto"  # auto (on for CUDA), on or off: torch.compile of each DiT block
    keep: int = 2
    log_every: int = 1
    warmup: int = 0
    grad_accum: int = 1
    adapter_dtype: str = "fp16"
    log_with: str | None = None
    num_workers: int | None = None  # image-loading processes; default min(8, CPUs)
    pos_embed: str | None = None  # when resolution differs from the base: "trick" (default) or "plain"
    # gamma_placement, rank, lora_alpha, lora_targets, adapter_dim, prompt_tokens: set as options of their own
    # (flags, recipe keys, config.toml keys), kept together as the object the methods take.
    method_settings: MethodSettings = field(default_factory=MethodSettings)
    image_column: str | None = None  # a dataset's image column (default: its first Image feature)
    label_column: str | None = None  # a dataset's label column (default: its first ClassLabel feature)
    # Text-to-image data (engine/data/captions.py says where captions come from, in which order).
    caption_column: str | None = None  # metadata files' / a dataset's text column (default: text, else caption)
    caption_template: str | None = None  # class folders as captions, e.g. "a photo of {class}"
    caption_dropout: float | None = None  # the fraction of captions replaced by the empty one (default: the family's)
    max_text_tokens: int | None = None  # default: the base's (PixArt-alpha 120, PixArt-Sigma 300, SD3 256, FLUX 512)
    validation_prompts: list[str] | None = None  # preview prompts (default: the data's first captions)
    class_balance: bool = False  # draw every class equally often, whatever its image count
    # "auto": aspect-ratio buckets (engine/data/buckets.py), "none": the square crop; default: auto where the
    # base takes any image size (text-to-image families), none where it takes one square (DiT)
    buckets: str | None = None
    repeats: int | dict[str, int] = 1  # items per epoch: a global count, or {class name: count} in a recipe
    snr_gamma: float | None = None  # min-SNR-gamma weighting of the MSE term
    p2_gamma: float | None = None  # P2 weighting (k = 1) of the MSE term
    timestep_sampling: str | None = None  # flow bases (SD3, FLUX): logit_normal (default), uniform or mode
    # held out of the data for the validation loss: per class (DiT), per class and aspect-ratio bucket (text)
    val_fraction: float = 0.0
    val_data: str | None = None  # or a separate validation folder / dataset (captioned, for text-to-image)
    val_every: int = 0  # validation loss every N steps (0: only at the end, when there is a validation set)
    eval_every: int = 0  # FID/KID (and CLIP score) of samples every N steps (0: never)
    eval_n: int | None = None  # samples per evaluation; default: DiT 1000, text-to-image one per eval prompt
    eval_reference: str | None = None  # image folder or statistics .npz (text-to-image default: the held-out set)
    eval_metrics: str = "fid"  # comma-separated EVAL_METRICS (training/config.py)
    eval_prompts: str | None = None  # text-to-image: a prompts file to sample (default: the held-out captions)
    clip_model: str | None = None  # the clip metric's CLIP: hub id or folder (default: DEFAULT_CLIP_MODEL)
    inception_weights: str | None = None
    keep_best: str | None = None  # "fid", "clip" or "val_loss": keep best/adapter.safetensors

    @classmethod
    def from_options(cls: type[Fields], options: dict) -> Fields:
        """From flat options (the names of `option_fields`), as flags, recipes and config.toml give them."""
        settings = {k: options[k] for k in METHOD_SETTINGS if k in options}
        rest = {k: v for k, v in options.items() if k not in METHOD_SETTINGS}
        return cls(**rest, method_settings=MethodSettings.from_dict(settings))

    def options(self) -> dict:
        """The flat options, in field order (the method settings where `method_settings` stands); LoRA targets
        comma-separated, as typed. `from_options` reads it back."""
        flat = {}
        for name, value in dataclasses.asdict(self).items():
            if name != "method_settings":
                flat[name] = value
                continue
            flat |= value
            if value["lora_targets"] is not None:
                flat["lora_targets"] = ",".join(value["lora_targets"])
        return flat


def option_fields() -> dict[str, dataclasses.Field]:
    """Every flat option's dataclass field, by name: FitFields's and, for `method_settings`, MethodSettings's."""
    found = {}
    for f in dataclasses.fields(FitFields):
        found |= {g.name: g for g in dataclasses.fields(MethodSettings)} if f.name == "method_settings" else {f.name: f}
    return found
