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
from difffit.engine.models.families.pipeline_bases import TEXT_PARTS, PipelineBase, read_json
from difffit.engine.progress import library_bars_off, say

LONG_PROMPTS_SHOWN = 3
# encode(pipe, texts, device, max_tokens) -> {name: (B, ...)}: a family's call of its pipeline's encode_prompt.
PipelineEncode = Callable[[object, list[str], torch.device, int], dict[str, torch.Tensor]]


def pipeline_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, name)


# transformers' "Token indices sequence length is longer than the specified maximum" comes from here: it is
# meant for a developer running a sequence through a model untruncated, and difffit truncates on purpose.
TOKENIZER_LOGGER = "transformers.tokenization_utils_base"


@contextlib.contextmanager
def quiet_pipeline(name: str) -> Iterator[None]:
    """The pipeline's and its tokenizers' own truncation warnings off: difffit says it once, its way."""
    loggers = [logging.getLogger(pipeline_class(name).__module__), logging.getLogger(TOKENIZER_LOGGER)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
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
                    folder, torch_dtype=dtype, variant=variant
                )
        except (OSError, ValueError, RuntimeError, AttributeError) as e:
            raise DiffFitError(
                f"Could not load the {name.replace('_', ' ')} of {base.spec} from {folder} ({error_summary(e)})."
            ) from None
        parts[name] = encoder.to(device).eval().requires_grad_(False)
    return parts


class PipelinePromptEncoder:
    """`encoder(texts)` -> the family's tensors on the CPU, through the pipeline's encode_prompt (the encoders
    load on the first call). Texts longer than `max_tokens` tokens of `long_text_tokenizer` (the component whose
    length --max-text-tokens sets) are truncated as the pipeline does; `report_truncated()` says so in one line
    for all the texts encoded so far (`what`: "prompt" or "caption")."""

    def __init__(
        self,
        base: PipelineBase,
        device: torch.device | str,
        max_tokens: int,
        what: str,
        encode: PipelineEncode,
        long_text_tokenizer: str,
    ) -> None:
        self.base, self.device, self.max_tokens, self.what = base, torch.device(device), max_tokens, what
        self.encode, self.long_text_tokenizer = encode, long_text_tokenizer
        self.loaded: tuple[dict, object] | None = None
        self.long: dict[str, int] = {}  # text -> its length in tokens, for the texts longer than max_tokens

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.loaded is None:
            parts = text_components(self.base, self.device, encoder_dtype(self.device))
            empty = dict.fromkeys(self.base.components.names())
            self.loaded = parts, pipeline_class(self.base.pipeline)(**{**empty, "transformer": None, **parts})
        parts, pipe = self.loaded
        self.long.update(long_texts(texts, parts[self.long_text_tokenizer], self.max_tokens))
        with quiet_pipeline(self.base.pipeline):
            out = self.encode(pipe, list(texts), self.device, self.max_tokens)
        return {name: tensor.cpu() for name, tensor in out.items()}

    def report_truncated(self) -> None:
        """One line for the texts encoded so far that were cut, naming a few of them; then starts over."""
        if not self.long:
            return
        count, m = len(self.long), self.max_tokens
        shown = "; ".join(
            f"{text[:60]!r}{'...' if len(text) > 60 else ''} ({n} tokens)"
            for text, n in list(self.long.items())[:LONG_PROMPTS_SHOWN]
        )
        more = f" and {count - LONG_PROMPTS_SHOWN} more" if count > LONG_PROMPTS_SHOWN else ""
        said = (
            f"{count} {self.what}s are longer than {m} tokens; their ends are cut"
            if count > 1
            else f"1 {self.what} is longer than {m} tokens; its end is cut"
        )
        # Plain text, never markup: a prompt may hold [brackets].
        say(("Warning:", "yellow"), f" {said}: {shown}{more}.")
        self.long = {}


def long_texts(texts: Sequence[str], tokenizer, max_tokens: int) -> dict[str, int]:
    """{text: its length in tokens} of the `texts` longer than `max_tokens` tokens of `tokenizer`."""
    # verbose=False: the tokenizer's own "longer than the maximum" notice is for untruncated model inputs
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True, verbose=False).input_ids]
    return {text: n for text, n in zip(texts, lengths, strict=True) if n > max_tokens}


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
        index = {
            **{k: v for k, v in index.items() if not k.startswith("_")},
            "_class_name": base.pipeline,
            "_diffusers_version": diffusers.__version__,
            "transformer": ["diffusers", type(model).__name__],
        }
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
