"""Training data: image-folder scanning, decoding any image file to RGB, the reference (ADM) crop.

A folder of class sub-folders is a labelled dataset (sorted folder names are the classes); a flat
folder is one class. A Hugging Face dataset (`engine.data.hf_datasets`) is the same `ImageFolder` with rows
for files. Text-to-image data carries a caption per item (`engine.data.captions` finds them).
Every image is decoded to RGB and center-cropped the way ADM/DiT did it, to a square or (aspect-ratio
buckets, `engine.data.buckets`) to a width x height; `engine.data.latents` turns the crops into latents.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

from difffit.engine.errors import DiffFitError
from difffit.engine.io import files_signature, has_marker
from difffit.engine.progress import say, track

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
OUTPUT_ROOTS = ("runs", "samples")  # the default parents of fit's and sample's outputs
# The most elongated image the centre crop takes: resized, it holds at most 50 crops' pixels (150 MB at 1024 px).
MAX_ASPECT_RATIO = 50


Size = tuple[int, int]  # (width, height) in pixels
EXIF_ORIENTATION = 0x0112
TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height (exif_transpose turns the image)


class BadImage(Exception):
    """An image file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Row:
    """Row `index` of a dataset: the item a dataset has where a folder has a file."""

    index: int
    source: str

    def __str__(self) -> str:  # how a skipped row is named
        return f"{self.source} row {self.index}"


class RowSource(Protocol):
    """A table of images (engine.data.hf_datasets.HFRows): what the rows of an ImageFolder are read from."""

    def load(self, index: int) -> Image.Image: ...  # RGB, or raise BadImage

    def size(self, index: int) -> Size: ...  # the size load() gives, from the header; or raise BadImage

    def signature(self, rows: Sequence[int]) -> str: ...  # what the latent cache keys on


@dataclass(frozen=True)
class ImageFolder:
    """The usable images of a folder (or rows of a dataset), their labels, and the skipped ones (item, reason).

    `captions`, when set, holds one caption per item, aligned with `files` (every subset keeps it so).
    """

    root: Path
    files: list[Path] | list[Row]
    labels: list[int]
    class_names: list[str]
    skipped: list[tuple[Path | Row, str]] = field(default_factory=list)
    rows: RowSource | None = None  # set for a dataset, whose files are then Rows
    captions: list[str] | None = None
    outside_captions: dict[str, str] = field(default_factory=dict)  # caption -> a file outside `root` it came from

    def __post_init__(self) -> None:
        for name in ("labels", "captions"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.files):
                raise ValueError(f"{len(values)} {name} for {len(self.files)} items: they must be aligned")

    def __len__(self) -> int:
        return len(self.files)

    def load(self, item: Path | Row) -> Image.Image:
        return self.rows.load(item.index) if self.rows is not None else load_image(item)

    def size(self, item: Path | Row) -> Size:
        """(width, height) of the decoded item, read from its header (no pixels decoded); or raise BadImage."""
        return self.rows.size(item.index) if self.rows is not None else image_size(item)

    def key(self, item: Path | Row) -> str:
        """The item's name in the latent cache."""
        return f"row-{item.index}" if self.rows is not None else str(item.relative_to(self.root))

    def signature(self) -> str:
        """What the items' latents depend on: row numbers and the dataset fingerprint, or paths, sizes, mtimes."""
        if self.rows is not None:
            return self.rows.signature([row.index for row in self.files])
        return files_signature(self.files, self.root)

    def by_key(self, reasons: dict[str, str]) -> dict[Path | Row, str]:
        """{cache key: reason} -> {item: reason}, for `without`."""
        return {item: reasons[self.key(item)] for item in self.files if self.key(item) in reasons}

    def take(self, indices: Sequence[int]) -> ImageFolder:
        """The items at `indices` (a held-out split); classes are kept, nothing counts as skipped."""
        return replace(self, **self._subset(indices), skipped=[])

    def without(self, bad: dict[Path | Row, str]) -> ImageFolder:
        """The same folder with the files in `bad` moved to `skipped` (class indices are kept)."""
        keep = [i for i, f in enumerate(self.files) if f not in bad]
        return replace(self, **self._subset(keep), skipped=self.skipped + [(f, bad[f]) for f in self.files if f in bad])

    def _subset(self, indices: Sequence[int]) -> dict:
        """The per-item fields at `indices`: the one place that knows which fields are aligned with `files`."""
        return {
            name: None if values is None else [values[i] for i in indices]
            for name, values in (("files", self.files), ("labels", self.labels), ("captions", self.captions))
        }

    def keep_classes(self, names: Sequence[str]) -> ImageFolder:
        """The items of the classes named in `names`, labelled by their place there (a held-out set takes the
        training data's classes this way, after some were dropped)."""
        place = {name: i for i, name in enumerate(names)}
        new = [place.get(name) for name in self.class_names]
        keep = [i for i, label in enumerate(self.labels) if new[label] is not None]
        subset = self._subset(keep) | {"labels": [new[self.labels[i]] for i in keep]}
        return replace(self, **subset, class_names=list(names))


def without_unreadable_classes(folder: ImageFolder, scanned: ImageFolder, announce: bool = True) -> ImageFolder:
    """`folder` (`scanned` less its unreadable items) without the classes that lost every item, named on stderr
    as a class folder without images is: the adapter would have a class it never trained."""
    left = set(folder.labels)
    gone = sorted({label for label in scanned.labels if label not in left})
    if not gone:
        return folder
    if announce:
        say(
            (
                f"No readable images in {', '.join(folder.class_names[i] for i in gone)}; not used as class(es).",
                "yellow",
            )
        )
    return folder.keep_classes([name for i, name in enumerate(folder.class_names) if i not in gone])


def image_files(folder: Path, recursive: bool, skip_outputs: bool = False) -> list[Path]:
    """The image files under `folder` (by extension, any case; hidden files skipped), sorted.

    Symbolic links are followed, but each real folder is read once; a link back to a folder above it
    (`up -> ..`, `self -> .`) is a loop: named on stderr, not followed. So a data folder never yields
    another class's images, and never hangs. Each name of a file is an image of its own (hard links and
    links to one file, each with its own caption), as the folder lists them.
    With `skip_outputs` (training data), folders difffit wrote (runs, samples, merges: they hold its
    marker) are passed over, so `difffit fit .` inside a data folder does not train on its own earlier
    output; eval-fid reads them (samples are what it scores).
    """
    top = folder.resolve()
    seen_folders, found = {top}, []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        if skip_outputs and has_marker(here):
            dirnames.clear()
            continue
        for name in sorted(filenames):
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS or name.startswith("."):
                continue
            path = here / name
            try:
                st = path.stat()  # through links: the real file
            except OSError:  # a dangling link
                continue
            if stat.S_ISREG(st.st_mode):
                found.append(path)
        if not recursive:
            break
        real_here, kept = here.resolve(), []
        for name in sorted(dirnames):  # sorted: a folder reached by two paths is always read under the same one
            if links_back(here / name, real_here, top):
                continue
            real = (here / name).resolve()
            if real not in seen_folders:
                seen_folders.add(real)
                kept.append(name)
        dirnames[:] = kept
    return sorted(found)


def links_back(link: Path, *below: Path) -> bool:
    """Whether the folder `link` leads to a folder above (or equal to) one of the real folders `below`:
    a symlink loop. It is named on stderr; the caller does not follow it."""
    target = link.resolve()
    if not any(real.is_relative_to(target) for real in below):
        return False
    say((f"Not following {link}: it links back to {target}, a folder above it (a loop).", "yellow"))
    return True


def is_output_folder(folder: Path) -> bool:
    """A folder difffit wrote, or one holding only difffit's outputs (the default `runs/` and `samples/`)."""
    return has_marker(folder) or (folder.name in OUTPUT_ROOTS and any(has_marker(p) for p in folder.iterdir()))


def scan_image_folder(
    root: str | os.PathLike, validate: bool = False, num_workers: int = 0, progress: bool = True
) -> ImageFolder:
    """List the images under `root`: class sub-folders (sorted) are the classes, a flat folder is one.

    Only the extensions in IMAGE_EXTENSIONS count (any case); other files are ignored. With
    `validate`, every image is decoded once and unreadable ones go to `skipped`.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DiffFitError(f"The data folder {root} does not exist or is not a folder.")
    subdirs = sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and not is_output_folder(p) and not links_back(p, root.resolve())
    )
    files: list[Path] = []
    labels: list[int] = []
    class_names: list[str] = []
    empty = []
    for sub in subdirs:
        found = image_files(sub, recursive=True, skip_outputs=True)
        if found:
            files += found
            labels += [len(class_names)] * len(found)
            class_names.append(sub.name)
        else:
            empty.append(sub.name)
    if class_names and empty:
        say((f"No images in {', '.join(empty)}; not used as class(es).", "yellow"))
    if not class_names:  # flat folder: one class named after the folder
        files = image_files(root, recursive=False, skip_outputs=True)
        labels = [0] * len(files)
        class_names = [root.resolve().name]
    if not files:
        raise DiffFitError(
            f"No images found in {root}.",
            hint=f"Put {', '.join(sorted(IMAGE_EXTENSIONS))} files in it, one sub-folder per class.",
        )
    folder = ImageFolder(root, files, labels, class_names)
    if validate:
        folder = folder.without(find_bad_images(folder, 8, num_workers, progress))
        require_images(folder)
    return folder


def require_images(folder: ImageFolder) -> None:
    if not folder.files:
        raise DiffFitError(
            f"None of the {len(folder.skipped)} image files in {folder.root} could be read.",
            hint="The files are named above with the reason each one was skipped.",
        )


# --------------------------------------------------------------------------------------------
# Decoding and the reference preprocessing
# --------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, EXIF orientation applied; transparency is composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16/32-bit grayscale: Pillow's convert() clips at 255 instead of rescaling.
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


@contextlib.contextmanager
def reading() -> Iterator[None]:
    """Pillow's many errors for a broken file (OSError, SyntaxError, ...) as one BadImage with the reason."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; treat both as a decompression bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("larger than Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS)") from None
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadImage(f"not a readable image ({reason})") from None


def _check_not_empty(path: Path | io.BytesIO) -> None:
    if (path.getbuffer().nbytes if isinstance(path, io.BytesIO) else path.stat().st_size) == 0:
        raise BadImage("empty file")


def load_image(path: Path | io.BytesIO) -> Image.Image:
    """Decode one file (or a dataset row's bytes) to RGB or raise BadImage with the reason."""
    with reading():
        _check_not_empty(path)
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)


def image_size(source: Path | io.BytesIO | Image.Image) -> Size:
    """(width, height) of the image `load_image` decodes (EXIF orientation applied), read from the header
    only: sorting thousands of images into aspect-ratio buckets must not decode them twice."""
    if isinstance(source, Image.Image):
        return _oriented_size(source)
    with reading():
        _check_not_empty(source)
        with Image.open(source) as image:
            return _oriented_size(image)


def _oriented_size(image: Image.Image) -> Size:
    width, height = image.size
    return (height, width) if image.getexif().get(EXIF_ORIENTATION) in TURNED else (width, height)


def check_elongation(size: Size) -> None:
    """Raise BadImage for an image more elongated than MAX_ASPECT_RATIO (see `center_crop`)."""
    if max(size) > MAX_ASPECT_RATIO * min(size):
        raise BadImage(
            f"{size[0]} x {size[1]} px is more elongated than {MAX_ASPECT_RATIO}:1, too thin for a centre crop"
        )


def center_crop(image: Image.Image, width: int, height: int | None = None) -> np.ndarray:
    """ADM's center crop, to a `width` square or to `width` x `height`: halve with a box filter while both
    sides are at least twice the target's, resize (bicubic) so the image just covers the target, then cut
    the central target. Returns (height, width, 3) uint8. For a square this is exactly ADM's: halve while
    the short side is >= 2*size, resize the short side to size, cut the central square.

    Scaling the short side up multiplies the long one too: a 60000 x 1 px strip (a 259-byte PNG) would
    become 15 million x 256 px, 12 GB. An image more elongated than MAX_ASPECT_RATIO is a BadImage
    (skipped with its reason); its crop would be a sliver of it anyway.
    """
    height = width if height is None else height
    check_elongation(image.size)
    while image.width >= 2 * width and image.height >= 2 * height:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = max(width / image.width, height / image.height)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - height) // 2, (arr.shape[1] - width) // 2
    return arr[top : top + height, left : left + width]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> float in [-1, 1], as the reference's Normalize(0.5, 0.5)."""
    return images.float() / 127.5 - 1.0


def as_size(size: int | Size) -> Size:
    """A crop size as (width, height): an int is a square."""
    return (size, size) if isinstance(size, int) else tuple(size)


class ImageDataset(torch.utils.data.Dataset):
    """Item i -> (uint8 (3, H, W) tensor or None, reason or None); never raises for a bad file.

    `size`: the crop, a square side or a (width, height) bucket."""

    def __init__(self, folder: ImageFolder, size: int | Size):
        self.folder, self.size = folder, as_size(size)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str | None]:
        try:
            arr = center_crop(self.folder.load(self.folder.files[i]), *self.size)
        except BadImage as exc:
            return None, str(exc)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1), None


def _as_list(batch: list) -> list:
    return batch


def image_batches(folder: ImageFolder, size: int | Size, batch_size: int, num_workers: int):
    dataset = ImageDataset(folder, size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list, shuffle=False
    )


def find_bad_images(
    folder: ImageFolder, size: int | Size, num_workers: int = 0, progress: bool = True
) -> dict[Path | Row, str]:
    """Decode (and crop to `size`) every image once; {item: reason} for the ones that cannot be used."""
    bad: dict[Path | Row, str] = {}
    with track(len(folder.files), "Checking images", progress) as advance:
        start = 0
        for batch in image_batches(folder, size, 64, num_workers):
            for offset, (_, reason) in enumerate(batch):
                if reason is not None:
                    bad[folder.files[start + offset]] = reason
            start += len(batch)
            advance(len(batch))
    return bad


def report_skipped(skipped: list[tuple[Path, str]], total: int) -> None:
    for path, reason in skipped:
        say(f"skipped {path}: {reason}")
    if skipped:
        say((f"Skipped {len(skipped)} of {total} image files (named above).", "yellow"))
