"""CLIP score: how well images agree with their prompts, with transformers' CLIPModel.

score = the mean over images of 100 * max(cos(image embedding, prompt embedding), 0): CLIPScore as
Hessel et al. (2021) define it, clamped per image, on the x100 scale torchmetrics and most
text-to-image papers report (Hessel et al. weight by 2.5 instead; torchmetrics clamps the mean rather
than each image, which differs only when a cosine is negative). Images go through the model's own
CLIPImageProcessor (resize, centre crop, normalise); prompts longer than the model's token limit (77
for OpenAI's CLIP) are cut there, as text-to-image pipelines cut them, and counted on stderr.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from difffit.engine.devices import resolve_device
from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation.options import DEFAULT_CLIP_MODEL
from difffit.engine.hub import HUB_ID, error_summary, hub_snapshot, split_hub_id
from difffit.engine.progress import library_bars_off, say, track

if TYPE_CHECKING:
    from difffit.engine.evaluation.inception import ImageSet

ImageLike = np.ndarray | Image.Image  # H x W x 3 uint8, or any Pillow image


def clip_score(
    images: Iterable[ImageLike],
    prompts: Sequence[str],
    *,
    model: str = DEFAULT_CLIP_MODEL,
    device: torch.device | str = "auto",
    batch_size: int = 64,
    progress: bool = True,
) -> float:
    """The CLIP score of images[i] against prompts[i] (see the module docstring). `model`: a hub id or a
    folder holding a CLIPModel with its processor (`save_pretrained`)."""
    return score_pairs(
        zip(images, prompts, strict=True),
        len(prompts),
        model=model,
        device=device,
        batch_size=batch_size,
        progress=progress,
    )


def score_pairs(
    pairs: Iterable[tuple[ImageLike, str]],
    count: int,
    *,
    model: str,
    device: torch.device | str,
    batch_size: int,
    progress: bool,
) -> float:
    """clip_score over (image, prompt) pairs streamed in batches; `count` sizes the progress bar."""
    scorer = ClipScorer(model, device)
    with track(count, "CLIP score", progress) as advance:
        for chunk in _batches(pairs, batch_size):
            images, prompts = zip(*chunk, strict=True)
            scorer.add(images, prompts)
            advance(len(chunk))
    return scorer.score()


class ClipScorer:
    """The CLIP score accumulated batch by batch (`add`), for a stream of images another consumer reads too
    (fit scores its samples as the Inception network reads them: each image is made once)."""

    def __init__(self, model: str, device: torch.device | str):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.net, self.processor = load_clip(model, self.device)
        self.max_tokens = self.net.config.text_config.max_position_embeddings
        self.total, self.scored, self.cut = 0.0, 0, 0

    @torch.no_grad()
    def add(self, images: Sequence[ImageLike], prompts: Sequence[str]) -> None:
        net, processor, device = self.net, self.processor, self.device
        lengths = [len(ids) for ids in processor.tokenizer(list(prompts), verbose=False)["input_ids"]]
        self.cut += sum(length > self.max_tokens for length in lengths)
        text = processor.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(device)
        # Writable copies (an array of a Pillow image is read-only, which torch.from_numpy warns about).
        pixels = processor.image_processor(images=[np.array(i) for i in images], return_tensors="pt")["pixel_values"]
        # What CLIPModel.get_{image,text}_features compute, spelled out: their return type changed
        # between transformers 4 (a tensor) and 5 (a model output).
        image = net.visual_projection(net.vision_model(pixel_values=pixels.to(device)).pooler_output)
        prompt = net.text_projection(net.text_model(**text).pooler_output)
        cosine = torch.nn.functional.cosine_similarity(image.double(), prompt.double(), dim=-1)
        self.total += (100 * cosine.clamp(min=0)).sum().item()
        self.scored += len(images)

    def take_sums(self) -> tuple[float, int, int]:
        """(score total, images scored, prompts cut) so far, and start again from zero: one batch's sums, which
        another process's batches are added to in batch order (`add_sums`) for the one-process score."""
        sums = (self.total, self.scored, self.cut)
        self.total, self.scored, self.cut = 0.0, 0, 0
        return sums

    def add_sums(self, total: float, scored: int, cut: int) -> None:
        self.total, self.scored, self.cut = self.total + total, self.scored + scored, self.cut + cut

    def score(self) -> float:
        """The mean over every image added; the prompts cut to the token limit are counted on stderr."""
        if not self.scored:
            raise DiffFitError("There are no images to compute a CLIP score of.")
        if self.cut:
            say(
                (
                    f"{self.cut} of {self.scored} prompts are longer than the CLIP model's {self.max_tokens} tokens; "
                    f"they were scored on their first {self.max_tokens}.",
                    "yellow",
                )
            )
        return self.total / self.scored


class ScoredAsRead:
    """An image set (with `prompts`, one per image) whose images `scorer` scores as another consumer (the
    Inception network) reads them: a model's samples are made once for FID and CLIP score together."""

    def __init__(self, images: ImageSet, scorer: ClipScorer):
        self.images, self.scorer = images, scorer
        self.count, self.name, self.prompts = images.count, images.name, images.prompts

    @property
    def skipped(self) -> list[tuple[Path, str]]:
        return self.images.skipped

    def batches(self, batch_size: int) -> Iterator:
        done = 0
        for batch in self.images.batches(batch_size):
            pairs = [
                (image, prompt)
                for image, prompt in zip(batch, self.prompts[done : done + len(batch)], strict=True)
                if image is not None
            ]
            done += len(batch)
            if pairs:
                self.scorer.add(*zip(*pairs, strict=True))
            yield batch


def load_clip(spec: str, device: torch.device):
    """(CLIPModel in float32 on `device`, CLIPProcessor) from a folder or a hub id (the Hugging Face cache;
    downloaded once unless downloads are off)."""
    from transformers import CLIPModel, CLIPProcessor

    folder = clip_folder(spec)
    try:
        with library_bars_off():
            model = CLIPModel.from_pretrained(folder, use_safetensors=True)
            processor = CLIPProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise DiffFitError(
            f"Cannot load the CLIP model {spec} from {folder} ({error_summary(exc)}).",
            hint="--clip-model takes a hub id or a folder with a CLIPModel and its processor.",
        ) from None
    return model.float().eval().to(device), processor


def clip_folder(spec: str) -> Path:
    """The local folder of a CLIP model spec (a folder, or a hub id through the Hugging Face cache)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not HUB_ID.match(spec):
        raise DiffFitError(
            f"--clip-model {spec!r} is neither a folder holding a CLIP model nor a hub id like {DEFAULT_CLIP_MODEL}."
        )
    repo_id, subfolder = split_hub_id(spec)
    prefix = f"{subfolder}/" if subfolder else ""
    snapshot = hub_snapshot(
        repo_id,
        [f"{prefix}*.json", f"{prefix}*.txt", f"{prefix}*.safetensors"],
        what=f"the CLIP model {spec}",
        instead="pass --clip-model a local folder",
    )
    return snapshot / subfolder if subfolder else snapshot


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
