"""What every pipeline family does through diffusers' own pipeline classes: encode text with the
pipeline's `encode_prompt`, build the pipeline around difffit's transformer, write a merged pipeline folder.

- Text: the pipeline class is built with only its tokenizers and text encoders loaded (the classes its
  model_index.json names, from transformers), and its own `encode_prompt` does the tokenizing, padding,
  truncation and pooling, so captions are encoded at training exactly as prompts are at sampling. The
  encoders load on the first call: a run whose captions are all cached never loads (or downloads) them.
- Merge: the folded transformer saved by diffusers in the base file's dtype; every other component
  hard-linked from the base's folder (copied across file systems), never re-saved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from difffit.engine.errors import DiffFitError
from difffit.engine.hub import error_summary
from difffit.engine.io import atomic_path
from difffit.engine.models.families.pipelines import TEXT_PARTS, PipelineBase, read_json
from difffit.engine.progress import library_bars_off, say

LONG_PROMPTS_SHOWN = 3
# encode(pipe, texts, device, max_tokens) -> {name: (B, ...)}: a family's call of its pipeline's encode_prompt.
PipelineEncode = Callable[[object, list[str], torch.device, int], dict[str, torch.Tensor]]


def pipeline_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, name)


@contextlib.contextmanager
def quiet_pipeline(name: str) -> Iterator[None]:
    """The pipeline's own truncation warnings off: difffit says it once, its way."""
    logger = logging.getLogger(pipeline_class(name).__module__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def encoder_dtype(device: torch.device | str) -> torch.dtype:
    # T5 v1.1 was trained in bf16, and fp16 overflows it: bf16 on a GPU (half of T5-XXL's fp32 18 GB); CLIP is
    # at home in bf16 too. fp32 on the CPU.
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def text_components(base: PipelineBase, device: torch.device | str, dtype: torch.dtype) -> dict[str, object]:
    """Every tokenizer and text encoder of the base's pipeline, by component name (encoders on `device` in
    `dtype`, frozen). Tokenizers load fast where transformers has a fast one (AutoTokenizer)."""
    import transformers

    parts = {}
    for name in base.components.names():
        if not name.startswith(TEXT_PARTS):
            continue
        folder = base.components.path(name, f"the {name.replace('_', ' ')}")
        try:
            with library_bars_off():
                if name.startswith("tokenizer"):
                    parts[name] = transformers.AutoTokenizer.from_pretrained(folder)
                    continue
                variant = "fp16" if any(folder.glob("*.fp16*.safetensors")) else None
                encoder = getattr(transformers, base.components.library_class(name)).from_pretrained(
                    folder, torch_dtype=dtype, variant=variant)
        except (OSError, ValueError, RuntimeError, AttributeError) as e:
            raise DiffFitError(f"Could not load the {name.replace('_', ' ')} of {base.spec} from {folder} "
                               f"({error_summary(e)}).") from None
        parts[name] = encoder.to(device).eval().requires_grad_(False)
    return parts


def pipeline_prompt_encoder(base: PipelineBase, device: torch.device | str, max_tokens: int, what: str,
                            encode: PipelineEncode, long_text_tokenizer: str
                            ) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """`encode(texts)` -> the family's tensors on the CPU, through the pipeline's encode_prompt. Texts longer
    than `max_tokens` tokens of `long_text_tokenizer` (the component whose length --max-text-tokens sets) are
    truncated as the pipeline does, with one warning naming them (`what`: "prompt" or "caption")."""
    loaded = []

    @torch.no_grad()
    def run(texts: list[str]) -> dict[str, torch.Tensor]:
        if not loaded:
            parts = text_components(base, device, encoder_dtype(device))
            empty = dict.fromkeys(base.components.names())
            loaded.append((parts, pipeline_class(base.pipeline)(**{**empty, "transformer": None, **parts})))
        parts, pipe = loaded[0]
        warn_truncated(texts, parts[long_text_tokenizer], max_tokens, what)
        with quiet_pipeline(base.pipeline):
            out = encode(pipe, list(texts), torch.device(device), max_tokens)
        return {name: tensor.cpu() for name, tensor in out.items()}

    return run


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


def make_scheduler(base: PipelineBase, name: str, names: dict[str, str]):
    """The scheduler `name` (a key of `names`, which maps --scheduler names to diffusers classes, or
    "pipeline": the pipeline's own), built from the pipeline's scheduler config."""
    import diffusers

    config = base.scheduler_config()
    if name not in (*names, "pipeline"):
        raise DiffFitError(f"Unknown --scheduler {name!r} for this base; choose {', '.join(names)} or pipeline.")
    return getattr(diffusers, names.get(name, config.get("_class_name"))).from_config(config)


def default_scheduler_name(base: PipelineBase, names: dict[str, str]) -> str:
    """The --scheduler name of the pipeline's own scheduler ("pipeline" when difffit has no short name)."""
    cls = base.scheduler_config().get("_class_name")
    return next((name for name, klass in names.items() if klass == cls), "pipeline")


# -- merge -----------------------------------------------------------------------------------------


def write_pipeline_folder(base: PipelineBase, model: torch.nn.Module, folder: Path) -> None:
    """`model` (folded) saved as the transformer of a pipeline folder holding the base's other components."""
    import diffusers

    sources = {name: base.components.path(name, f"the {name.replace('_', ' ')}") for name in base.components.names()}
    index = read_json(base.components.folder / "model_index.json")
    dtype = getattr(torch, base.stored_dtype)
    with atomic_path(folder, kind="merge") as tmp:
        tmp.mkdir()
        if next(model.parameters()).dtype != dtype:
            model.to(dtype)
        model.save_pretrained(tmp / "transformer")
        for name, source in sources.items():
            _link_tree(source, tmp / name)
        index = {**{k: v for k, v in index.items() if not k.startswith("_")},
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
