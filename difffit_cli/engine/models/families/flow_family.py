"""What the rectified-flow MM-DiT families (SD3, FLUX) share: the flow-matching loss, prompt encoding and
sampling through their pipelines, and sampling defaults.

- Loss: `models/flow_matching.py` on the base's own FlowMatchEulerDiscreteScheduler config (its shift, and
  FLUX.1-dev's dynamic shifting by the image's token count).
- Text: every text encoder's output is cached, pooled and sequence (SD3: two CLIPs + T5; FLUX: CLIP
  pooled + T5), by the pipeline's own `encode_prompt`; `--max-text-tokens` is the T5 token count.
- Sampling: the pipeline's `__call__` with the cached embeddings, one CPU generator per image (the pipelines
  draw each image's latents from its own generator), so image i depends only on the seed, its prompt and i.
  Steps and guidance: the model card's where difffit knows the base by name, else the pipeline's defaults.
- DiffFit: every bias except the timestep and guidance embedders', the affine norms (the q/k RMSNorm
  weights of SD3.5 and FLUX), gamma on each residual branch's output projection of both streams (image and
  text) of the first half of the blocks.
"""

from __future__ import annotations

import numpy as np
import torch

from difffit_cli.engine.devices import autocast_dtype
from difffit_cli.engine.models.families.pipeline_family import PipelineFamily
from difffit_cli.engine.models.families.pipeline_io import (
    default_scheduler_name,
    make_scheduler,
    pipeline_class,
    pipeline_prompt_encoder,
    quiet_pipeline,
)
from difffit_cli.engine.models.families.pipelines import PipelineBase, pipeline_default
from difffit_cli.engine.models.flow_matching import FlowMatching

# --scheduler names -> diffusers classes, built from the pipeline's own scheduler config.
SCHEDULERS = {"euler": "FlowMatchEulerDiscreteScheduler"}
# Preview grids take at most the pipelines' own default steps (FLUX's and SD3's 28): a model card's 50
# (FLUX.1-dev) would make each preview nearly twice as slow, for a grid that only shows training's progress.
PREVIEW_STEPS = 28


class FlowFamily(PipelineFamily):
    """A rectified-flow pipeline family; subclasses say how their pipeline is called."""

    prediction = "flow"
    max_text_tokens_limit = 512  # both pipelines' check_inputs refuse longer T5 sequences
    schedulers = ("pipeline", *SCHEDULERS)
    long_text_tokenizer: str  # the T5 tokenizer's component name, whose length --max-text-tokens sets
    card_defaults: dict[str, dict]  # Hub repo -> the sampling settings its model card recommends

    def encode(self, pipe, texts: list[str], device: torch.device, max_tokens: int) -> dict[str, torch.Tensor]:
        """The pipeline's encode_prompt on `texts` -> the tensors training and sampling condition on."""
        raise NotImplementedError

    def pipeline_inputs(self, base: PipelineBase, text: dict, negative: dict, cfg_scale: float) -> dict:
        """The text and guidance arguments of the pipeline's __call__ (embeddings on the CPU, float32)."""
        raise NotImplementedError

    def tokens(self, base: PipelineBase, x0: torch.Tensor) -> int:
        """The image tokens of a latent batch (dynamic shifting's input)."""
        patch = 2  # SD3's patch and FLUX's 2 x 2 packing
        return (x0.shape[-2] // patch) * (x0.shape[-1] // patch)

    def diffusion(self, base: PipelineBase, timestep_sampling: str | None = None) -> FlowMatching:
        return FlowMatching(base.scheduler_config(), lambda x0: self.tokens(base, x0),
                            timestep_sampling or "logit_normal")

    def prompt_encoder(self, base: PipelineBase, device: torch.device, max_tokens: int, what: str = "prompt"):
        return pipeline_prompt_encoder(base, device, max_tokens, what, self.encode, self.long_text_tokenizer)

    def sampling_defaults(self, base: PipelineBase) -> dict:
        defaults = {"cfg_scale": float(pipeline_default(base.pipeline, "guidance_scale")),
                    "steps": int(pipeline_default(base.pipeline, "num_inference_steps"))}
        return {**defaults, **self.card(base), "scheduler": default_scheduler_name(base, SCHEDULERS)}

    def preview_sampling(self, base: PipelineBase) -> dict:
        return {"steps": min(PREVIEW_STEPS, self.sampling_defaults(base)["steps"])}

    def card(self, base: PipelineBase) -> dict:
        """The sampling settings the base's model card recommends where they differ from the pipeline's."""
        return self.card_defaults.get(base.hub_id, {})

    @torch.inference_mode()
    def sample_images(self, base: PipelineBase, text: dict, negative: dict, generators: list[torch.Generator],
                      options, device: torch.device) -> np.ndarray:
        """One batch through the pipeline -> float (B, H, W, 3) in [0, 1], the pipeline's own post-processing."""
        vae = base.vae(device, torch.float32)
        parts = {**dict.fromkeys(base.components.names()), "transformer": base.model, "vae": vae.vae,
                 "scheduler": make_scheduler(base, options.scheduler, SCHEDULERS)}
        pipe = pipeline_class(base.pipeline)(**parts)
        pipe.set_progress_bar_config(disable=True)
        mixed = autocast_dtype(options.mixed_precision)
        inputs = {name: value.to(device) if isinstance(value, torch.Tensor) else value
                  for name, value in self.pipeline_inputs(base, text, negative, options.cfg_scale).items()}
        # The pipeline draws its latents in the embeddings' dtype and steps the scheduler in it: float32 always;
        # under --mixed-precision autocast runs the transformer in bf16/fp16.
        with quiet_pipeline(base.pipeline), torch.autocast(device.type, dtype=mixed or torch.float32,
                                                           enabled=mixed is not None):
            return pipe(**inputs, num_inference_steps=options.steps, generator=generators,
                        width=options.width or base.resolution, height=options.height or base.resolution,
                        output_type="np").images
