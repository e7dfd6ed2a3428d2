"""The DiT family: class-conditional DiT with the reference numerics (engine/models/dit.py, bases.py).

- Loading: every spec `models.bases.load_dit_base` reads (original checkpoints, diffusers DiT folders and
  repos, aliases, random: and the bundled tiny base).
- difffit trains every bias except the timestep embedder's (the paper freezes that embedder), the
  class table, affine norm parameters if the model has any, and gamma on the attention and MLP
  branches of the chosen blocks (`GAMMA`, in the reference layout); bitfit every bias plus a new class
  table; full everything but the fixed sin-cos `pos_embed`; the other baselines what they add.
- New classes: a dataset with K classes gets a (K+1)-row table, every row (the null row K included) a
  copy of the base's null row, so an untrained adapter samples the base's unconditional distribution.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from difffit.engine.errors import DiffFitError
from difffit.engine.models.bases import RANDOM_PREFIX, Base, describe_base, load_dit_base
from difffit.engine.models.diffusers_layout import dit_pipeline_problem, write_dit_pipeline
from difffit.engine.models.dit import CLASS_TABLE, DiT, DiTConfig
from difffit.engine.models.family import METHODS, BaseSpec, Family, ModelCall, Setter, added_reference
from difffit.engine.models.fp8 import KEEP_BF16
from difffit.engine.models.gamma import GammaPlacement, GammaSite
from difffit.engine.models.lora_names import DIT_LORA
from difffit.engine.models.resolution import set_resolution
from difffit.engine.models.schedulers import SCHEDULERS

if TYPE_CHECKING:
    from difffit.engine.methods.adapter import AdapterMeta

DIT_OPTIONS = ("resolution", "num_classes", "num_heads", "vae")  # load_dit_base's keywords
SHAPE_KEYS = ("depth", "hidden_size", "patch_size", "in_channels", "learn_sigma")  # what an adapter cannot change


def resize_class_table(model: DiT, num_classes: int) -> None:
    """Give the model a fresh (num_classes + 1)-row table, every row a copy of the base's null row."""
    old = model.y_embedder.embedding_table.weight
    null_row = old[model.config.num_classes].detach()
    table = null_row.expand(num_classes + 1, -1).clone()
    model.y_embedder.embedding_table.weight = nn.Parameter(table, requires_grad=old.requires_grad)
    model.y_embedder.embedding_table.num_embeddings = num_classes + 1
    model.y_embedder.num_classes = num_classes
    model.config = replace(model.config, num_classes=num_classes)


# gamma in the reference layout: Parameters of each block, multiplied in after the projection they fold into.
GAMMA = GammaPlacement(
    branch={"blocks": (GammaSite("attn.proj", slot="gamma_attn"), GammaSite("mlp.fc2", slot="gamma_mlp"))},
    attention={
        "blocks": (GammaSite("attn.qkv", slot="attn.gamma_qkv"), GammaSite("attn.proj", slot="attn.gamma_proj"))
    },
)


class DiTFamily(Family):
    name = "dit"
    title = "DiT"
    conditioning = "class"
    methods = METHODS
    gamma = GAMMA
    class_table = CLASS_TABLE
    groups = ("biases", "gamma", "class_table", "norms", "lora", "adapters", "prompts", "other")
    pipeline_tag = "unconditional-image-generation"  # the Hub has no class-conditional task
    merge_formats = ("original", "diffusers", "peft")
    pipeline_name = "DiTPipeline"
    schedulers = SCHEDULERS
    fixed_size = True  # the reference's positional embedding is stored for one square grid
    lora = DIT_LORA
    keep_bf16 = KEEP_BF16

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, DiT)

    def load(self, base: BaseSpec, **options: Any) -> Base:
        return load_dit_base(base, **{k: v for k, v in options.items() if k in DIT_OPTIONS})

    def describe(self, base: Base) -> dict:
        return describe_base(base)

    def config_of(self, model: DiT) -> dict:
        return model.config.to_dict()

    def channels(self, config: dict) -> dict:
        dit = DiTConfig(**config)
        return {"in_channels": dit.in_channels, "learn_sigma": dit.learn_sigma}

    def adapter_base_options(self, meta: AdapterMeta, spec: str) -> dict:
        base_config = DiTConfig(**meta.base_config)
        if spec.startswith(RANDOM_PREFIX):  # a random base is only reproducible at the size it was made with
            return {"resolution": base_config.input_size * meta.vae_factor, "num_classes": base_config.num_classes}
        return {"num_heads": base_config.num_heads}  # a non-standard width does not say its heads

    def latent_size(self, config: dict) -> int:
        return config["input_size"]

    def empty_model(self, config: dict) -> DiT:
        return DiT(DiTConfig(**config))

    def architecture(self, config: dict) -> str:
        return DiTConfig(**config).name

    def check_config(self, config: dict) -> None:
        DiTConfig(**config)

    def is_trainable(self, name: str, method: str, new_classes: bool, norm_names: set[str]) -> bool:
        if method == "full":
            return name != "pos_embed"
        is_bias = name.endswith(".bias")
        new_table = new_classes and name == CLASS_TABLE
        if method == "bitfit":
            return is_bias or new_table
        if method != "difffit":  # the baselines that add modules: those train (they add nothing else)
            return new_table or (added_reference(name) is not None and ".gamma_" not in name)
        return (
            (is_bias and not name.startswith("t_embedder."))
            or name == CLASS_TABLE
            or ".gamma_" in name
            or name in norm_names
        )

    def prepare_conditioning(self, model: DiT, num_classes: int | None, new_classes: bool) -> bool:
        """A new class table when `num_classes` differs from the base's, or `new_classes` (same count,
        other classes); otherwise the base's table stays (and difffit fine-tunes it)."""
        new_classes = new_classes or (num_classes is not None and num_classes != model.config.num_classes)
        if new_classes:
            resize_class_table(model, num_classes if num_classes is not None else model.config.num_classes)
        return new_classes

    def fits_adapter(self, model: DiT, meta: AdapterMeta) -> bool:
        return all(getattr(model.config, key) == meta.base_config[key] for key in SHAPE_KEYS)

    def shape_for_adapter(self, model: DiT, meta: AdapterMeta, setter: Setter) -> None:
        """The base at the adapter's resolution and with its class table's size (its values come with the
        adapter's tensors); every change goes through `setter`, so the swapper can undo it."""
        setter(model, "config", model.config)
        if (model.config.input_size, model.config.pos_embed_scale) != (meta.latent_size, meta.pos_embed_scale):
            setter(model, "pos_embed", model.pos_embed)
            set_resolution(model, meta.latent_size, meta.pos_embed_scale)
        if meta.new_class_table:
            setter(model.y_embedder, "num_classes", model.y_embedder.num_classes)
            table = model.y_embedder.embedding_table
            setter(table, "num_embeddings", table.num_embeddings)
            model.y_embedder.num_classes = meta.num_classes
            table.num_embeddings = meta.num_classes + 1
            model.config = replace(model.config, num_classes=meta.num_classes)

    def adopt_adapter(self, base: Base, meta: AdapterMeta) -> None:
        base.class_names = meta.class_names

    def pipeline_problem(self, meta: AdapterMeta) -> str | None:
        return dit_pipeline_problem(DiTConfig(**meta.config), meta.vae_spec)

    def write_pipeline(self, base: Base, model: DiT, folder: Path) -> None:
        write_dit_pipeline(model, folder, class_names=base.class_names, vae=base.vae())

    def forward(self, model: DiT, base: Base) -> ModelCall:
        return model  # model(x_t, t, labels)

    def check_sample_size(self, base: Base, width: int | None, height: int | None) -> None:
        if width is not None or height is not None:
            raise DiffFitError(
                f"--width and --height apply to text-to-image bases; {base.spec} samples at its "
                f"{base.resolution} px (move it with `difffit upscale-res`)."
            )

    def preview_sampling(self, base: Base) -> dict:
        return {"scheduler": "ddim", "steps": 25}  # not DDPM's 250

    def sampling_defaults(self, base: Base) -> dict:
        return {"cfg_scale": 4.0, "scheduler": "ddpm"}  # ddpm's steps: its own default (250)

    def set_gradient_checkpointing(self, model: DiT, enabled: bool) -> None:
        model.set_gradient_checkpointing(enabled)

    def attention_shape(self, model: DiT) -> dict:
        config = model.config
        return {
            "heads": config.num_heads,
            "head_dim": config.hidden_size // config.num_heads,
            "tokens": (config.input_size // config.patch_size) ** 2,
        }


DIT = DiTFamily()
fold_scale_factors = DIT.fold_gamma  # gamma * (W x + b) = (gamma W) x + gamma b, then gamma dropped
