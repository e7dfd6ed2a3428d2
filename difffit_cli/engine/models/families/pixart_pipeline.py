"""PixArt through diffusers' own pipeline: the T5 text encoder, sampling, and the merged pipeline folder.

- Text: captions and prompts are encoded by the pipeline class's own `encode_prompt` (its tokenizer
  padding, truncation and attention mask), built with only the tokenizer and T5 loaded. Captions are
  not "cleaned" (`clean_caption=False`): the pipeline's cleaning needs bs4 and ftfy and rewrites text
  (lower case, URLs); difffit encodes what was written, at training and at sampling alike.
- Sampling: the pipeline's `__call__` with the prompt embeddings, one CPU generator per image and no
  resolution binning, so image i depends only on the seed, its prompt and i, and a merged pipeline given
  the same embeddings and generators draws the same images.
- Merge: the folded transformer saved by diffusers in the base file's dtype; the text encoder, tokenizer,
  VAE and scheduler hard-linked from the base's folder (copied across file systems), never re-saved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from difffit_cli.engine.errors import DiffFitError
from difffit_cli.engine.hub import error_summary
from difffit_cli.engine.io import atomic_path
from difffit_cli.engine.models.families.pixart_bases import PixArtBase, pipeline_default, read_json
from difffit_cli.engine.progress import library_bars_off, say

COMPONENTS = ("text_encoder", "tokenizer", "vae", "scheduler")
# --scheduler names -> diffusers classes, built from the pipeline's own scheduler config.
SCHEDULERS = {"dpm-solver": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler"}
PIPELINE_LOGGER = "diffusers.pipelines.pixart_alpha"
LONG_PROMPTS_SHOWN = 3


def _pipeline_class(name: str):
    import diffusers

    return getattr(diffusers, name)


@contextlib.contextmanager
def _quiet_pipeline():
    """The pipeline's own truncation and caption-cleaning warnings off: difffit says it once, its way."""
    logger = logging.getLogger(PIPELINE_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def text_encoder(base: PixArtBase, device: torch.device | str, dtype: torch.dtype):
    """(tokenizer, T5 encoder on `device` in `dtype`) of the base's pipeline."""
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer_dir = base.components.path("tokenizer", "the tokenizer")
    encoder_dir = base.components.path("text_encoder", "the text encoder")
    variant = "fp16" if any(encoder_dir.glob("*.fp16*.safetensors")) else None
    try:
        with library_bars_off():
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            encoder = T5EncoderModel.from_pretrained(encoder_dir, torch_dtype=dtype, variant=variant)
    except (OSError, ValueError, RuntimeError) as e:
        raise DiffFitError(f"Could not load the text encoder of {base.spec} from {encoder_dir.parent} "
                           f"({error_summary(e)}).") from None
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


def prompt_encoder(base: PixArtBase, device: torch.device | str, dtype: torch.dtype, max_tokens: int,
                   what: str = "prompt") -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """`encode(texts)` -> {"prompt_embeds": (B, L, D), "prompt_attention_mask": (B, L)} on the CPU, by the
    pipeline's encode_prompt. Texts longer than `max_tokens` tokens are truncated as the pipeline does,
    with one warning naming them (`what`: "prompt" or "caption"). The encoder loads on the first call, so
    a run whose texts are all cached never loads (or downloads) it."""
    loaded = []

    @torch.no_grad()
    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        if not loaded:
            tokenizer, encoder = text_encoder(base, device, dtype)
            loaded.append((tokenizer, _pipeline_class(base.pipeline)(tokenizer=tokenizer, text_encoder=encoder,
                                                                     vae=None, transformer=None, scheduler=None)))
        tokenizer, pipe = loaded[0]
        warn_truncated(texts, tokenizer, max_tokens, what)
        with _quiet_pipeline():
            embeds, mask, _, _ = pipe.encode_prompt(list(texts), do_classifier_free_guidance=False, device=device,
                                                    clean_caption=False, max_sequence_length=max_tokens)
        return {"prompt_embeds": embeds.cpu(), "prompt_attention_mask": mask.cpu()}

    return encode


def warn_truncated(texts: Sequence[str], tokenizer, max_tokens: int, what: str) -> None:
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True).input_ids]
    long = [(text, n) for text, n in zip(texts, lengths, strict=True) if n > max_tokens]
    if not long:
        return
    shown = "; ".join(f"{text[:60]!r}{'...' if len(text) > 60 else ''} ({n} tokens)" for text, n in
                      long[:LONG_PROMPTS_SHOWN])
    more = f" and {len(long) - LONG_PROMPTS_SHOWN} more" if len(long) > LONG_PROMPTS_SHOWN else ""
    # Plain text, never markup: a prompt may hold [brackets].
    say(("Warning:", "yellow"), f" {len(long)} {what}(s) longer than the base's {max_tokens} tokens are cut to "
        f"{max_tokens}, as the pipeline does: {shown}{more}.")


# -- sampling --------------------------------------------------------------------------------------


def default_scheduler_name(base: PixArtBase) -> str:
    """The --scheduler name of the pipeline's own scheduler ("pipeline" when difffit has no short name)."""
    cls = base.scheduler_config().get("_class_name")
    return next((name for name, klass in SCHEDULERS.items() if klass == cls), "pipeline")


def make_scheduler(base: PixArtBase, name: str):
    """The scheduler `name` (a SCHEDULERS key, or "pipeline": the pipeline's own), from the pipeline's config."""
    import diffusers

    config = base.scheduler_config()
    if name not in (*SCHEDULERS, "pipeline"):
        raise DiffFitError(f"Unknown --scheduler {name!r} for PixArt; choose {', '.join(SCHEDULERS)} or pipeline.")
    return getattr(diffusers, SCHEDULERS.get(name, config.get("_class_name"))).from_config(config)


def sampling_defaults(base: PixArtBase) -> dict:
    """The pipeline's own guidance scale, step count and scheduler."""
    return {"cfg_scale": float(pipeline_default(base.pipeline, "guidance_scale")),
            "steps": int(pipeline_default(base.pipeline, "num_inference_steps")),
                "scheduler": default_scheduler_name(base)}


@torch.inference_mode()
def pipeline_images(base: PixArtBase, text: dict[str, torch.Tensor], negative: dict[str, torch.Tensor],
                    generators: list[torch.Generator], *, cfg_scale: float, steps: int, scheduler: str,
                    width: int, height: int, device: torch.device, autocast_dtype: torch.dtype | None) -> np.ndarray:
    """One batch through the pipeline: `text` and `negative` hold one row per image -> float (B, H, W, 3) in
    [0, 1], the pipeline's own post-processing (`output_type="np"`)."""
    vae = base.vae(device, torch.float32)
    pipe = _pipeline_class(base.pipeline)(tokenizer=None, text_encoder=None, vae=vae.vae, transformer=base.model,
                                          scheduler=make_scheduler(base, scheduler))
    pipe.set_progress_bar_config(disable=True)
    # The pipeline draws its latents in the embeddings' dtype and steps the scheduler in it: float32 always
    # (bf16 scheduler steps lose detail); under --mixed-precision autocast runs the transformer in bf16/fp16.
    dtype = torch.float32
    with _quiet_pipeline(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                           enabled=autocast_dtype is not None):
        images = pipe(prompt_embeds=text["prompt_embeds"].to(device, dtype),
                      prompt_attention_mask=text["prompt_attention_mask"].to(device),
                      negative_prompt_embeds=negative["prompt_embeds"].to(device, dtype),
                      negative_prompt_attention_mask=negative["prompt_attention_mask"].to(device),
                      negative_prompt=None, guidance_scale=cfg_scale, num_inference_steps=steps, generator=generators,
                      width=width, height=height, use_resolution_binning=False, output_type="np").images
    return images


# -- merge -----------------------------------------------------------------------------------------


def write_pixart_pipeline(base: PixArtBase, model: torch.nn.Module, folder: Path) -> None:
    """`model` (folded) saved as the transformer of a pipeline folder holding the base's other components."""
    import diffusers

    sources = {name: base.components.path(name, f"the {name.replace('_', ' ')}") for name in COMPONENTS}
    index = read_json(base.components.folder / "model_index.json")
    dtype = getattr(torch, base.stored_dtype)
    with atomic_path(folder, kind="merge") as tmp:
        tmp.mkdir()
        if next(model.parameters()).dtype != dtype:
            model.to(dtype)
        model.save_pretrained(tmp / "transformer")
        for name, source in sources.items():
            _link_tree(source, tmp / name)
        index = {**{k: v for k, v in index.items() if k in COMPONENTS},
                 "_class_name": base.pipeline, "_diffusers_version": diffusers.__version__,
                 "transformer": ["diffusers", type(model).__name__]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _link_tree(source: Path, target: Path) -> None:
    """A copy of the folder `source` made of hard links (the files' bytes as they are), or of copies
    where a link cannot be made (another file system). Symlinks (the Hub cache's) are followed."""
    target.mkdir()
    for item in sorted(source.iterdir()):
        if item.is_dir():
            _link_tree(item, target / item.name)
            continue
        real = item.resolve()
        try:
            os.link(real, target / item.name)
        except OSError:
            shutil.copy2(real, target / item.name)
