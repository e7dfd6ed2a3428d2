"""What a run conditions the model on, by the family's kind: class labels (DiT) or caption embeddings
(text-to-image families); the fit options that apply to one kind only; what the preview grids show.

Text: each image's caption comes from `engine.data.captions` (sidecar NAME.txt, metadata files, a
dataset column, or a class-folder template). The embeddings of every unique caption, of the empty
caption (caption dropout) and of the preview prompts are computed once by the family's text encoder
and cached on disk beside the latents (`engine.data.text_cache`); the encoder is loaded only when a
caption is not cached yet, and is freed before the first training step, so training holds the
transformer and the cached tensors only (not T5-XXL's 9 GB).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from difffit.engine.data.batches import Captions, Labels
from difffit.engine.data.captions import attach_captions
from difffit.engine.data.images import ImageFolder
from difffit.engine.data.text_cache import TextEmbeddings, text_cache_dir, text_embeddings
from difffit.engine.devices import one_builder_first
from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation.sample import SamplingOptions
from difffit.engine.methods.trainable import check_method, same_classes
from difffit.engine.models.family import Family, TextConditioning
from difffit.engine.models.flow_matching import TIMESTEP_SAMPLING
from difffit.engine.training.config import FitConfig
from difffit.engine.training.state import Run

if TYPE_CHECKING:
    from accelerate import Accelerator

    from difffit.engine.models.bases import Base

PREVIEW_IMAGES = 8
# Options of one kind of family only: (FitConfig field, flag) and whether a value other than the default was given.
TEXT_ONLY = (
    ("caption_column", "--caption-column"),
    ("caption_template", "--caption-template"),
    ("max_text_tokens", "--max-text-tokens"),
    ("validation_prompts", "--validation-prompt"),
    ("caption_dropout", "--caption-dropout"),
    ("eval_prompts", "--eval-prompts"),
)
CLASS_ONLY = (("vae", "--vae"), ("num_heads", "--num-heads"))


def check_options(config: FitConfig, family: Family) -> None:
    """Refuse, in one sentence each, the options that do not apply to the base's family (before any work)."""
    check_method(config.method, family)
    if not family.fixed_size and config.pos_embed:
        raise DiffFitError(
            f"upscale-res moves DiT's fixed positional grid; a {family.title} transformer trains at any size as it is.",
            hint=f"Use `difffit fit --resolution {config.resolution}` instead.",
        )
    wrong = CLASS_ONLY if family.conditioning == "text" else TEXT_ONLY
    for field, flag in wrong:
        if getattr(config, field):
            kind = "class-conditional (DiT)" if family.conditioning == "text" else "text-to-image"
            raise DiffFitError(f"{flag} applies to {kind} bases, and this base is a {family.title} model.")
    if family.conditioning != "text" and "clip" in config.evaluation_metrics():
        raise DiffFitError(
            f"--eval-metrics clip scores samples against their captions, and this base is a "
            f"class-conditional {family.title} model.",
            hint="Use --eval-metrics fid.",
        )
    check_text_tokens(config, family)
    if family.prediction == "flow" and (config.snr_gamma is not None or config.p2_gamma is not None):
        flag = "--snr-gamma" if config.snr_gamma is not None else "--p2-gamma"
        raise DiffFitError(
            f"{flag} weights the epsilon-prediction loss, and {family.title} trains by rectified flow "
            "(it predicts noise minus data), where it does not apply.",
            hint="Leave it out; --timestep-sampling chooses where the flow loss is drawn.",
        )
    if family.prediction != "flow" and config.timestep_sampling is not None:
        raise DiffFitError(
            f"--timestep-sampling applies to rectified-flow bases (SD3, FLUX), and this base is a "
            f"{family.title} model, which draws its diffusion steps uniformly."
        )
    if config.buckets == "auto" and family.fixed_size:
        raise DiffFitError(
            f"--buckets auto needs a base that takes any image size, and a {family.title} model takes "
            "only its own square size.",
            hint="Leave --buckets out (none is the default here).",
        )
    if config.class_balance and config.bucketed(family):
        raise DiffFitError(
            f"--class-balance cannot be used with aspect-ratio buckets (on by default for "
            f"{family.title}), where each batch comes from one bucket.",
            hint="Add --buckets none to balance classes over square crops.",
        )
    if config.mixed_precision == "fp8" and family.fp8_keep() is None:
        raise DiffFitError(
            f"--mixed-precision fp8 is not available on {family.title} bases yet.",
            hint="Use --mixed-precision bf16 (the default on CUDA).",
        )


def check_text_tokens(config: FitConfig, family: Family, base: Base | None = None) -> None:
    """Refuse a --max-text-tokens above what the family's pipeline reads: before loading where the family alone says
    (SD3, FLUX), and again once `base` is loaded where its pipeline does (PixArt-α 120, Σ 300)."""
    limit = family.text_token_limit(base) if isinstance(family, TextConditioning) else None
    if config.max_text_tokens is not None and limit is not None and config.max_text_tokens > limit:
        pipeline = f"{base.pipeline}" if base is not None else f"{family.title} pipeline"
        raise DiffFitError(
            f"--max-text-tokens {config.max_text_tokens:,} is above {limit}, the most a {pipeline} reads."
        )


def with_family_defaults(config: FitConfig, family: Family) -> FitConfig:
    """`config` with the options whose default is the family's filled in (caption dropout, timestep sampling),
    so the run's config.toml and its adapter record the values used."""
    if family.conditioning == "text" and config.caption_dropout is None:
        config = replace(config, caption_dropout=family.caption_dropout)
    if family.prediction == "flow" and config.timestep_sampling is None:
        config = replace(config, timestep_sampling=TIMESTEP_SAMPLING[0])
    return config


def with_captions(folder: ImageFolder, config: FitConfig, family: Family) -> ImageFolder:
    """The data with each image's caption attached, for a text-to-image family (named if one is missing)."""
    if family.conditioning != "text":
        return folder
    return attach_captions(folder, caption_column=config.caption_column, caption_template=config.caption_template)


@dataclass(frozen=True)
class Conditioning:
    """What the model is conditioned on: each item's condition, the class plan, what previews show."""

    conditions: Labels | Captions  # labels, or the cached caption embeddings
    class_names: list[str]  # the class table trained (a kept DiT table keeps the base's names)
    new_classes: bool  # DiT: whether the class table is new
    preview_prompts: list[str]  # text-to-image: what previews show


def prepare_conditions(
    config: FitConfig,
    accelerator: Accelerator,
    base: Base,
    family: Family,
    folder: ImageFolder,
    held_out_prompts: list[str],
    progress: bool,
) -> Conditioning:
    """The conditions of `folder`'s items (labels, or cached caption embeddings, `held_out_prompts` encoded
    with them), the class plan and the preview prompts."""
    if family.conditioning == "class":
        new_classes = not same_classes(folder.class_names, base.config.num_classes, base.class_names)
        # A kept table keeps the base's class names (e.g. ImageNet's labels for wnid folders).
        class_names = folder.class_names if new_classes or not base.class_names else list(base.class_names)
        # Label dropout is drawn with the global batch (engine.data.batches), the same rows on any number of
        # processes, so the model's own per-process draw is off. The null class follows the table trained:
        # the folder's classes (a kept table has as many).
        base.model.y_embedder.dropout_prob = 0.0
        labels = Labels(folder.labels, base.config.class_dropout_prob, null=len(folder.class_names))
        return Conditioning(labels, class_names, new_classes, [])
    preview_prompts = config.validation_prompts or list(dict.fromkeys(folder.captions))[:PREVIEW_IMAGES]
    # The empty caption: what caption dropout trains on, and the previews' guidance (where the family has one)
    extra = ([""] if config.caption_dropout or family.negative_prompts else []) + preview_prompts + held_out_prompts
    embeddings = _caption_embeddings(config, accelerator, base, family, folder.captions, extra, progress)
    return Conditioning(Captions(embeddings, config.caption_dropout), folder.class_names, False, preview_prompts)


def _caption_embeddings(
    config: FitConfig,
    accelerator: Accelerator,
    base: Base,
    family: Family,
    captions: list[str],
    extra: list[str],
    progress: bool,
) -> TextEmbeddings:
    device = accelerator.device
    max_tokens = config.max_text_tokens or base.max_text_tokens
    with one_builder_first(accelerator):  # process 0 encodes; the others wait, then open the finished cache
        encode = family.prompt_encoder(base, device, max_tokens, "caption")
        embeddings = text_embeddings(
            captions,
            encode,
            key=family.text_key(base, max_tokens),
            cache_dir=text_cache_dir(config.cache_dir),
            batch_size=config.batch_size,
            progress=progress,
            extra=extra,
        )
        encode.report_truncated()
        del encode  # the text encoder with it: training needs the transformer and the cached tensors only
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return embeddings


def preview_inputs(run: Run) -> dict:
    """What the preview grid shows: the first classes, or the preview prompts (already encoded)."""
    if run.family.conditioning == "class":
        return {"classes": list(range(min(len(run.class_names), PREVIEW_IMAGES)))}
    return {"prompts": run.preview_prompts, "embeddings": run.batches.conditions.embeddings}


def preview_options(run: Run, batch_size: int = PREVIEW_IMAGES) -> SamplingOptions:
    """How previews (and a text-to-image run's in-training evaluation) sample: the family's cheap preview
    settings over its defaults, fixed seed; a text-to-image run at the size it trains at (DiT at its base's)."""
    size = {} if run.family.fixed_size else {"width": run.resolution, "height": run.resolution}
    return SamplingOptions(
        **{"cfg_scale": None, "scheduler": None, **run.family.preview_sampling(run.base), **size},
        seed=run.config.seed,
        batch_size=batch_size,
        mixed_precision=run.sampling_precision,
    )


def text_summary(run: Run) -> dict:
    """The text settings an adapter's training summary records (nothing for class-conditional runs)."""
    if run.family.conditioning != "text":
        return {}
    flow = {"timestep_sampling": run.config.timestep_sampling} if run.family.prediction == "flow" else {}
    # resolution: the size it trained at, which FLUX's transformer config does not say (AdapterMeta.resolution)
    return {
        "pipeline": run.base.pipeline,
        "resolution": run.resolution,
        "caption_dropout": run.config.caption_dropout,
        **flow,
        "max_text_tokens": run.config.max_text_tokens or run.base.max_text_tokens,
        "captions": len(set(run.folder.captions)),
        "validation_prompts": run.preview_prompts,
        **({"outside_prompts": outside} if (outside := _outside_prompts(run)) else {}),
    }


def _outside_prompts(run: Run) -> dict[str, str]:
    """{preview prompt: the file outside the data folder it was read from}, for push to warn about."""
    if run.config.validation_prompts:  # the user's own prompts
        return {}
    return {p: run.folder.outside_captions[p] for p in run.preview_prompts if p in run.folder.outside_captions}
