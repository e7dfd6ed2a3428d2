"""Image sets for eval-fid: a count and uint8 batches, and a content digest where one is cheap.

A folder of images (searched recursively, any sizes: each image is resized on its own; `difffit sample`
folders count, without their grid.png), `arr_0` of
an `.npz` (N x H x W x 3 uint8, the ADM/DiT sample format, streamed out of the zip), or samples of
an adapter or base made in memory and never written. A folder written by `difffit sample` is read
as its manifest lists it (its samples, not its grid); the prompts it records, if any, are `prompts`.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from difffit.engine.data.images import IMAGE_EXTENSIONS, BadImage, ImageFolder, center_crop, image_files, load_image
from difffit.engine.errors import DiffFitError, require_at_least
from difffit.engine.evaluation.inception import file_digest
from difffit.engine.evaluation.options import CLASS_FID_SAMPLING, FID_SAMPLING
from difffit.engine.evaluation.sample import SamplingOptions, generate_batches, parse_classes
from difffit.engine.evaluation.sample_folder import (
    GRID,
    finished_manifest,
    read_manifest,
    sample_images,
    sample_prompts,
)
from difffit.engine.io import files_signature
from difffit.engine.methods.sources import load_source
from difffit.engine.models.families import family_of

if TYPE_CHECKING:
    from difffit.engine.data.text_cache import TextEmbeddings
    from difffit.engine.models.bases import Base

DEFAULT_NUM_SAMPLES = 50_000  # the reference FID protocol; used when GENERATED is a class-conditional model


class FolderImages:
    """Image files under a folder, recursively, sorted (a sample folder's samples, in order); unreadable ones
    are skipped and listed."""

    def __init__(self, root: Path, limit: int | None = None):
        self.root, self.name = root, str(root)
        samples = sample_images(root)  # a `difffit sample` folder: exactly its samples, in order
        self.files = samples if samples is not None else without_sample_grids(image_files(root, recursive=True))
        if not self.files:
            raise DiffFitError(
                f"No images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, recursively)."
            )
        prompts = _aligned_prompts(root, len(self.files)) if samples is not None else None
        self.files = _take(self.files, limit, str(root))
        self.count = len(self.files)
        self.prompts = None if prompts is None else prompts[: self.count]
        self.skipped: list[tuple[Path, str]] = []

    def digest(self) -> str:
        return hashlib.sha256(b"folder\0" + files_signature(self.files, self.root).encode()).hexdigest()

    def batches(self, batch_size: int) -> Iterator[list[np.ndarray]]:
        """Decoded in threads (Pillow releases the GIL), one batch ahead of the consumer."""

        def read(path: Path) -> np.ndarray | None:
            try:
                return np.asarray(load_image(path))
            except BadImage as exc:
                if all(path != seen for seen, _ in self.skipped):  # read once per metric family: listed once
                    self.skipped.append((path, str(exc)))
                return None

        chunks = [self.files[i : i + batch_size] for i in range(0, self.count, batch_size)]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append([pool.submit(read, path) for path in chunk])
                if len(pending) > 1:
                    yield [f.result() for f in pending.popleft()]
            while pending:
                yield [f.result() for f in pending.popleft()]


class NpzImages:
    """`arr_0` of an .npz, streamed out of the zip in batches (a 50k x 256 px file is 9.8 GB)."""

    def __init__(self, path: Path, limit: int | None = None):
        self.path, self.name = path, str(path)
        with _open_npy(path, "arr_0") as (_, shape, dtype, fortran):
            if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8 or fortran:
                raise DiffFitError(
                    f"{path}: arr_0 holds {dtype} {tuple(shape)}; expected N x H x W x 3 uint8 images "
                    f"(the ADM/DiT sample format)."
                )
        if shape[0] == 0:
            raise DiffFitError(f"{path}: arr_0 holds no images.")
        self.shape = shape
        self.count = len(_take(range(shape[0]), limit, str(path)))
        self.skipped: list[tuple[Path, str]] = []
        # The npz a sample run wrote (--npz) holds its samples in order, so the run's prompts apply.
        manifest = read_manifest(path.parent)
        prompts = _aligned_prompts(path.parent, shape[0]) if manifest and path.name in manifest[0] else None
        self.prompts = None if prompts is None else prompts[: self.count]

    def digest(self) -> str:
        return file_digest(self.path)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        per_image = int(np.prod(self.shape[1:]))
        with _open_npy(self.path, "arr_0") as (f, *_):
            for start in range(0, self.count, batch_size):
                n = min(batch_size, self.count - start)
                data = f.read(n * per_image)
                yield np.frombuffer(bytearray(data), dtype=np.uint8).reshape(n, *self.shape[1:])


@dataclass(frozen=True)
class ModelInput:
    """How eval-fid samples GENERATED when it is an adapter or a base."""

    sampling: SamplingOptions = field(default_factory=lambda: SamplingOptions.from_fields(FID_SAMPLING))
    classes: Sequence[str] | None = None  # --class names or indices, cycled
    base: str | None = None  # for an adapter: another base than the one it names
    vae: str | None = None
    force_base: bool = False
    prompts: Sequence[str] | None = None  # a text-to-image model's prompts, cycled


class ModelSamples:
    """`count` samples of a loaded base (an adapter applied, or the model being trained), generated batch by
    batch and never written to disk. A text-to-image base samples `prompts` in turn (`embeddings`: already
    encoded, as fit's are); `prompts` is then each sample's prompt, which the clip metric scores against."""

    def __init__(
        self,
        base: Base,
        count: int,
        sampling: SamplingOptions,
        device: torch.device,
        *,
        classes: Sequence[int] | None = None,
        prompts: Sequence[str] | None = None,
        embeddings: TextEmbeddings | None = None,
        progress: bool = True,
        name: str = "samples",
        indices: Sequence[int] | None = None,
    ):
        """`indices`: which of the `count` samples to make (each sample is a function of its index); all of them
        by default."""
        require_at_least("-n", count, 1)
        self.base, self.sampling, self.classes = base, sampling, classes
        self.indices = list(range(count) if indices is None else indices)
        self.count = len(self.indices)
        self.cycled_prompts = list(prompts) if prompts else None  # sample i's prompt is i mod their number
        self.prompts = None if not prompts else [prompts[i % len(prompts)] for i in self.indices]
        self.embeddings, self.device, self.progress, self.name = embeddings, device, progress, name
        self.skipped: list[tuple[Path, str]] = []

    @classmethod
    def from_source(
        cls, source: str, count: int | None, model: ModelInput, device: torch.device, progress: bool = True
    ) -> ModelSamples:
        """eval-fid's GENERATED when it names an adapter or a base: a class-conditional one samples its classes
        (50,000 by default), a text-to-image one `model.prompts` (one image each by default)."""
        base, _ = load_source(source, base=model.base, vae=model.vae, force_base=model.force_base)
        family = family_of(base)
        if family.conditioning == "text":
            if not model.prompts:
                raise DiffFitError(
                    f"{source} is a text-to-image model; give eval-fid the prompts to sample it with.",
                    hint="Add --prompts FILE (one prompt per line).",
                )
            return cls(
                base,
                len(model.prompts) if count is None else count,
                model.sampling,
                device,
                prompts=model.prompts,
                progress=progress,
                name=source,
            )
        if model.prompts:
            raise DiffFitError(
                f"--prompts does not apply to {source}, a class-conditional {family.title} model.",
                hint="Use --class to choose its classes.",
            )
        sampling = replace(
            model.sampling, **{k: v for k, v in CLASS_FID_SAMPLING.items() if getattr(model.sampling, k) is None}
        )
        classes = parse_classes(model.classes or [], base.class_names, base.model.config.num_classes)
        return cls(
            base,
            DEFAULT_NUM_SAMPLES if count is None else count,
            sampling,
            device,
            classes=classes,
            progress=progress,
            name=source,
        )

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        sampling = replace(self.sampling, batch_size=batch_size)  # the extraction batch drives both
        for _, images in generate_batches(
            self.base,
            self.indices,
            sampling,
            classes=self.classes,
            prompts=self.cycled_prompts,
            embeddings=self.embeddings,
            device=self.device,
            progress=self.progress,
        ):
            yield images.numpy()


class CroppedImages:
    """The images of an ImageFolder (fit's held-out set), centre-cropped to a `side` square as fit samples:
    an in-training FID reference."""

    def __init__(self, folder: ImageFolder, side: int):
        self.folder, self.side, self.count = folder, side, len(folder)
        self.name = f"the held-out images of {folder.root}"
        self.skipped: list[tuple[Path, str]] = []

    def digest(self) -> str:
        return hashlib.sha256(f"held-out\0{self.side}\0{self.folder.signature()}".encode()).hexdigest()

    def batches(self, batch_size: int) -> Iterator[list[np.ndarray]]:
        for lo in range(0, self.count, batch_size):
            yield [center_crop(self.folder.load(item), self.side) for item in self.folder.files[lo : lo + batch_size]]


def without_sample_grids(files: list[Path]) -> list[Path]:
    """`files` of a folder holding `difffit sample` folders: their samples are read (scoring samples is what
    they are for), but not their grid.png, a picture of the others; an unfinished run is refused."""
    manifests = {folder: finished_manifest(folder) for folder in sorted({f.parent for f in files})}
    return [f for f in files if not (f.name == GRID and manifests[f.parent] and GRID in manifests[f.parent])]


def _aligned_prompts(folder: Path, count: int) -> list[str] | None:
    """A sample folder's prompts, one per sample, or None; a manifest whose count is off is refused."""
    prompts = sample_prompts(folder)
    if prompts is not None and len(prompts) != count:
        raise DiffFitError(
            f"{folder}/sample.json lists {len(prompts)} prompts for {count} samples.",
            hint="The folder was changed after sampling; sample it again.",
        )
    return prompts


def _take(items, limit: int | None, where: str):
    if limit is None:
        return items
    require_at_least("-n", limit, 1)
    if limit > len(items):
        raise DiffFitError(f"{where} holds {len(items)} images, fewer than the {limit} asked for with -n.")
    return items[:limit]


class _open_npy:
    """Context manager: (file object at the data, shape, dtype, fortran_order) of one npz member."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name

    def __enter__(self):
        try:
            self.zip = zipfile.ZipFile(self.path)
            self.file = self.zip.open(f"{self.name}.npy")
            version = np.lib.format.read_magic(self.file)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(self.file)
        except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
            self.__exit__()
            raise DiffFitError(f"{self.path}: cannot read {self.name} ({exc}).") from None
        return self.file, shape, dtype, fortran

    def __exit__(self, *exc) -> None:
        for handle in (getattr(self, "file", None), getattr(self, "zip", None)):
            if handle is not None:
                handle.close()


def npz_members(path: Path) -> set[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return {name.removesuffix(".npy") for name in zf.namelist()}
    except (zipfile.BadZipFile, OSError) as exc:
        raise DiffFitError(f"{path} is not a readable .npz file ({exc}).") from None
