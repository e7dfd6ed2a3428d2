"""What the rectified-flow MM-DiT families (SD3, FLUX) share on top of every pipeline family's machinery
(text_family.py: prompt encoding and sampling through the pipeline): the flow-matching loss, the
Euler scheduler, and cheaper previews.

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

import torch

from difffit.engine.models.families.pipeline_bases import PipelineBase
from difffit.engine.models.families.text_family import TextFamily
from difffit.engine.models.flow_matching import FlowMatching

# --scheduler names -> diffusers classes, built from the pipeline's own scheduler config.
SCHEDULERS = {"euler": "FlowMatchEulerDiscreteScheduler"}
# Preview grids take at most the pipelines' own default steps (FLUX's and SD3's 28): a model card's 50
# (FLUX.1-dev) would make each preview nearly twice as slow, for a grid that only shows training's progress.
PREVIEW_STEPS = 28


class FlowFamily(TextFamily):
    """A rectified-flow pipeline family; subclasses say how their pipeline is called."""

    prediction = "flow"
    max_text_tokens_limit = 512  # both pipelines' check_inputs refuse longer T5 sequences
    schedulers = ("pipeline", *SCHEDULERS)
    scheduler_classes = SCHEDULERS

    def tokens(self, base: PipelineBase, x0: torch.Tensor) -> int:
        """The image tokens of a latent batch (dynamic shifting's input)."""
        patch = 2  # SD3's patch and FLUX's 2 x 2 packing
        return (x0.shape[-2] // patch) * (x0.shape[-1] // patch)

    def diffusion(self, base: PipelineBase, timestep_sampling: str | None = None) -> FlowMatching:
        return FlowMatching(
            base.scheduler_config(), lambda x0: self.tokens(base, x0), timestep_sampling or "logit_normal"
        )

    def preview_sampling(self, base: PipelineBase) -> dict:
        return {"steps": min(PREVIEW_STEPS, self.sampling_defaults(base)["steps"])}
