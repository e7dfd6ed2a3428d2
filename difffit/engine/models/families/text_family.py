"""What the text-to-image families (PixArt, SD3, FLUX) share: diffusers pipelines as bases (pipeline_bases.py),
text encoded and images drawn by the pipeline's own code (pipeline_calls.py), and DiffFit described as data:
where gamma sits (`gamma`: the output projection of each residual branch, per block list; engine/models/gamma.py
holds it on the projection as a `ScaledLinear`), the embedders that stay frozen, and the modulation tables that
train. Blocks are numbered across the block lists in the order the image passes through them (FLUX: its 19
joint blocks, then its 38 single blocks), which `--gamma-blocks` counts in.

Memory: `--mixed-precision fp8` puts every frozen Linear in float8 except what `keep_bf16` names (each
family's embedders, modulation projections and final layer); gamma's projections go float8 with their
gamma (engine/models/fp8.py). `--grad-checkpointing` is diffusers' own switch, block by block.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from difffit.engine.devices import autocast_dtype
from difffit.engine.models.families.pipeline_bases import (
    PipelineBase,
    PipelineKind,
    load_pipeline_base,
    pipeline_default,
)
from difffit.engine.models.families.pipeline_calls import (
    PipelinePromptEncoder,
    default_scheduler_name,
    make_scheduler,
    pipeline_class,
    quiet_pipeline,
    write_pipeline_folder,
)
from difffit.engine.models.family import BaseSpec, Family, FreeSize, Setter, TextConditioning, added_reference

if TYPE_CHECKING:
    from difffit.engine.evaluation.sample import SamplingOptions
    from difffit.engine.methods.adapter import AdapterMeta


class TextFamily(TextConditioning, FreeSize, Family):
    """A text-to-image family whose bases are diffusers pipelines of `kind`."""

    methods = ("full", "bitfit", "lora", "difffit")
    groups = ("biases", "gamma", "modulation", "norms", "lora", "other")
    kind: PipelineKind
    frozen_embedders: tuple[str, ...]  # name prefixes of the timestep (and guidance, size) embedders
    tables: tuple[str, ...] = ()  # name suffixes of per-block modulation tables (PixArt's scale_shift_table)
    shape_keys: tuple[str, ...]  # the config keys an adapter cannot change
    config_keys: tuple[str, ...]  # the config keys an adapter file's config must have
    scheduler_classes: dict[str, str]  # --scheduler names -> diffusers classes, built from the pipeline's config
    card_defaults: dict[str, dict] = {}  # Hub repo -> the sampling settings its model card recommends

    # -- loading and describing -----------------------------------------------------------------------

    def load(self, base: BaseSpec, **options: Any) -> PipelineBase:
        """`info=True`: the weights of a local folder are read (for its fingerprint), a Hub repo's never:
        its counts come from its config on the meta device."""
        return load_pipeline_base(base, self.kind, weights=not options.get("info") or base.source == "folder")

    def describe(self, base: PipelineBase) -> dict:
        config = dict(base.model.config)
        return {
            "kind": "base",
            "spec": base.spec,
            "source_format": base.source_format,
            "pipeline": base.pipeline,
            "architecture": self.architecture(config),
            "total_params": sum(p.numel() for p in base.model.parameters()),
            "resolution": base.resolution,
            **self.shape_fields(config),
            "max_text_tokens": base.max_text_tokens,
            "fingerprint": base.fingerprint,
            "vae": base.vae_spec if base.source_format != "config" else None,
            "hub_id": base.hub_id,
        }

    @abstractmethod
    def shape_fields(self, config: dict) -> dict:
        """The config's sizes `info` shows (latent size, channels, patch, text width)."""

    def config_of(self, model: nn.Module) -> dict:
        # As JSON has it (tuples as lists), so a model's config compares equal to the one its adapter recorded.
        return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))

    def channels(self, config: dict) -> dict:
        channels = config["in_channels"]
        return {"in_channels": channels, "learn_sigma": config.get("out_channels") == 2 * channels}

    def empty_model(self, config: dict) -> nn.Module:
        import diffusers

        return getattr(diffusers, self.kind.transformer_class)(**config)

    def check_config(self, config: dict) -> None:
        for key in self.config_keys:
            if key not in config:
                raise TypeError(f"missing {key}")

    # -- what a method trains -------------------------------------------------------------------------

    def is_trainable(self, name: str, method: str, new_classes: bool, norm_names: set[str]) -> bool:
        if method == "full":
            return True
        table = name.endswith(self.tables)
        if method == "bitfit":
            return name.endswith(".bias") or table
        if method == "lora":
            return added_reference(name) is not None and ".gamma_" not in name
        return (
            (name.endswith(".bias") and not name.startswith(self.frozen_embedders))
            or table
            or ".gamma_" in name
            or name in norm_names
        )

    def parameter_group(self, name: str, norm_names: set[str]) -> str:
        if name.endswith(self.tables):
            return "modulation"
        return super().parameter_group(name, norm_names)

    def fits_adapter(self, model: nn.Module, meta: AdapterMeta) -> bool:
        mine = self.config_of(model)
        return all(mine.get(key) == meta.base_config.get(key) for key in self.shape_keys)

    def shape_for_adapter(self, model: nn.Module, meta: AdapterMeta, setter: Setter) -> None:
        """Swap in the adapter's gamma modules through `setter` (the swapper puts the plain ones back)."""
        if meta.method == "difffit":
            self.add_gamma(model, meta.gamma_blocks, meta.settings.get("gamma_placement", "branch"), setter)

    def adopt_adapter(self, base: PipelineBase, meta: AdapterMeta) -> None:
        base.text_tokens = meta.training.get("max_text_tokens")

    def write_pipeline(self, base: PipelineBase, model: nn.Module, folder: Path) -> None:
        write_pipeline_folder(base, model, folder)

    # -- text, sampling -------------------------------------------------------------------------------

    def check_ready(self, base: PipelineBase) -> None:
        base.check_components()

    def text_key(self, base: PipelineBase, max_tokens: int) -> str:
        return f"{base.pipeline}\n{base.components.encoder_identity()}\nmax_tokens={max_tokens}"

    @abstractmethod
    def encode(self, pipe: Any, texts: list[str], device: torch.device, max_tokens: int) -> dict[str, torch.Tensor]:
        """The pipeline's encode_prompt on `texts` -> the tensors training and sampling condition on."""

    def prompt_encoder(self, base: PipelineBase, device: torch.device, max_tokens: int, what: str = "prompt"):
        return PipelinePromptEncoder(base, device, max_tokens, what, self.encode, self.kind.long_text_tokenizer)

    @abstractmethod
    def pipeline_inputs(self, base: PipelineBase, text: dict, negative: dict, cfg_scale: float) -> dict:
        """The text and guidance arguments of the pipeline's __call__ (embeddings on the CPU, float32)."""

    def sampling_defaults(self, base: PipelineBase) -> dict:
        defaults = {
            "cfg_scale": float(pipeline_default(base.pipeline, "guidance_scale")),
            "steps": int(pipeline_default(base.pipeline, "num_inference_steps")),
        }
        return {**defaults, **self.card(base), "scheduler": default_scheduler_name(base, self.scheduler_classes)}

    def card(self, base: PipelineBase) -> dict:
        """The sampling settings the base's model card recommends where they differ from the pipeline's."""
        return self.card_defaults.get(base.hub_id, {})

    @torch.inference_mode()
    def sample_images(
        self,
        base: PipelineBase,
        text: dict,
        negative: dict,
        generators: list[torch.Generator],
        options: SamplingOptions,
        device: torch.device,
    ) -> np.ndarray:
        """One batch through the pipeline -> float (B, H, W, 3) in [0, 1], the pipeline's own post-processing."""
        vae = base.vae(device, torch.float32)
        parts = {
            **dict.fromkeys(base.components.names()),
            "transformer": base.model,
            "vae": vae.vae,
            "scheduler": make_scheduler(base, options.scheduler, self.scheduler_classes),
        }
        pipe = pipeline_class(base.pipeline)(**parts)
        pipe.set_progress_bar_config(disable=True)
        mixed = autocast_dtype(options.mixed_precision)
        inputs = {
            name: value.to(device) if isinstance(value, torch.Tensor) else value
            for name, value in self.pipeline_inputs(base, text, negative, options.cfg_scale).items()
        }
        # The pipeline draws its latents in the embeddings' dtype and steps the scheduler in it: float32 always
        # (bf16 scheduler steps lose detail); under --mixed-precision autocast runs the transformer in bf16/fp16.
        with (
            quiet_pipeline(base.pipeline),
            torch.autocast(device.type, dtype=mixed or torch.float32, enabled=mixed is not None),
        ):
            return pipe(
                **inputs,
                num_inference_steps=options.steps,
                generator=generators,
                width=options.width or base.resolution,
                height=options.height or base.resolution,
                output_type="np",
            ).images

    def set_gradient_checkpointing(self, model: nn.Module, enabled: bool) -> None:
        """diffusers' own switch (`ModelMixin.enable_gradient_checkpointing`: non-reentrant torch checkpointing
        of each block), which every diffusers transformer has."""
        if enabled:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
