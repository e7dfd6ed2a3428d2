"""PixArt through diffusers' own pipeline: the T5 text encoder and sampling (merge: pipeline_io.py).

- Text: captions and prompts are encoded by the pipeline class's own `encode_prompt` (its tokenizer
  padding, truncation and attention mask), built with only the tokenizer and T5 loaded. Captions are
  not "cleaned" (`clean_caption=False`): the pipeline's cleaning needs bs4 and ftfy and rewrites text
  (lower case, URLs); difffit encodes what was written, at training and at sampling alike.
- Sampling: the pipeline's `__call__` with the prompt embeddings, one CPU generator per image and no
  resolution binning, so image i depends only on the seed, its prompt and i, and a merged pipeline given
  the same embeddings and generators draws the same images.
"""

from __future__ import annotations

import numpy as np
import torch

from difffit_cli.engine.models.families.pipeline_io import (
    default_scheduler_name,
    make_scheduler,
    pipeline_class,
    pipeline_prompt_encoder,
    quiet_pipeline,
)
from difffit_cli.engine.models.families.pipelines import PipelineBase, pipeline_default

# --scheduler names -> diffusers classes, built from the pipeline's own scheduler config.
SCHEDULERS = {"dpm-solver": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler"}


def _encode_prompt(pipe, texts: list[str], device: torch.device, max_tokens: int) -> dict[str, torch.Tensor]:
    embeds, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device=device,
                                            clean_caption=False, max_sequence_length=max_tokens)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


def prompt_encoder(base: PipelineBase, device: torch.device | str, max_tokens: int, what: str = "prompt"):
    """`encode(texts)` -> {"prompt_embeds": (B, L, D), "prompt_attention_mask": (B, L)} on the CPU."""
    return pipeline_prompt_encoder(base, device, max_tokens, what, _encode_prompt, "tokenizer")


def sampling_defaults(base: PipelineBase) -> dict:
    """The pipeline's own guidance scale, step count and scheduler."""
    return {"cfg_scale": float(pipeline_default(base.pipeline, "guidance_scale")),
            "steps": int(pipeline_default(base.pipeline, "num_inference_steps")),
            "scheduler": default_scheduler_name(base, SCHEDULERS)}


@torch.inference_mode()
def pipeline_images(base: PipelineBase, text: dict[str, torch.Tensor], negative: dict[str, torch.Tensor],
                    generators: list[torch.Generator], *, cfg_scale: float, steps: int, scheduler: str,
                    width: int, height: int, device: torch.device, autocast_dtype: torch.dtype | None) -> np.ndarray:
    """One batch through the pipeline: `text` and `negative` hold one row per image -> float (B, H, W, 3) in
    [0, 1], the pipeline's own post-processing (`output_type="np"`)."""
    vae = base.vae(device, torch.float32)
    pipe = pipeline_class(base.pipeline)(tokenizer=None, text_encoder=None, vae=vae.vae, transformer=base.model,
                                         scheduler=make_scheduler(base, scheduler, SCHEDULERS))
    pipe.set_progress_bar_config(disable=True)
    # The pipeline draws its latents in the embeddings' dtype and steps the scheduler in it: float32 always
    # (bf16 scheduler steps lose detail); under --mixed-precision autocast runs the transformer in bf16/fp16.
    dtype = torch.float32
    with quiet_pipeline(base.pipeline), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                                       enabled=autocast_dtype is not None):
        images = pipe(prompt_embeds=text["prompt_embeds"].to(device, dtype),
                      prompt_attention_mask=text["prompt_attention_mask"].to(device),
                      negative_prompt_embeds=negative["prompt_embeds"].to(device, dtype),
                      negative_prompt_attention_mask=negative["prompt_attention_mask"].to(device),
                      negative_prompt=None, guidance_scale=cfg_scale, num_inference_steps=steps, generator=generators,
                      width=width, height=height, use_resolution_binning=False, output_type="np").images
    return images
