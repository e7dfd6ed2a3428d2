"""Training data: image-folder scanning, the reference (ADM) preprocessing, and the latent cache.

A folder of class sub-folders is a labelled dataset (sorted folder names are the classes); a flat
folder is one class. Every image is decoded to RGB, center-cropped the way ADM/DiT did it, and
encoded by the VAE into a latent *distribution* (mean, std). The cache stores that distribution for
the image and its mirror, so training draws `mean + std * noise` exactly as on-the-fly encoding
would, without running the VAE again.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from difffit_cli.engine.errors import DiffFitError
from difffit_cli.engine.io import atomic_path, files_signature, user_cache_dir
from difffit_cli.engine.progress import track

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
CACHE_FORMAT = 1


class BadImage(Exception):
    """An image file that cannot be used; the message says why."""


@dataclass(frozen=True)
class ImageFolder:
    """The usable images of a folder, their labels, and the files that were skipped (path, reason)."""

    root: Path
    files: list[Path]
    labels: list[int]
    class_names: list[str]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def without(self, bad: dict[Path, str]) -> ImageFolder:
        """The same folder with the files in `bad` moved to `skipped` (class indices are kept)."""
        keep = [i for i, f in enumerate(self.files) if f not in bad]
        return replace(
            self,
            files=[self.files[i] for i in keep],
            labels=[self.labels[i] for i in keep],
            skipped=self.skipped + [(f, bad[f]) for f in self.files if f in bad],
        )


def image_files(folder: Path, recursive: bool) -> list[Path]:
    """The image files under `folder` (by extension, any case; hidden files skipped), sorted."""
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p for p in pattern
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def scan_image_folder(root: str | os.PathLike, validate: bool = False, num_workers: int = 0,
                      progress: bool = True) -> ImageFolder:
    """List the images under `root`: class sub-folders (sorted) are the classes, a flat folder is one.

    Only the extensions in IMAGE_EXTENSIONS count (any case); other files are ignored. With
    `validate`, every image is decoded once and unreadable ones go to `skipped`.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DiffFitError(f"The data folder {root} does not exist or is not a folder.")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    class_names: list[str] = []
    for sub in subdirs:
        found = image_files(sub, recursive=True)
        if found:
            files += found
            labels += [len(class_names)] * len(found)
            class_names.append(sub.name)
    if not class_names:  # flat folder: one class named after the folder
        files = image_files(root, recursive=False)
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
        raise DiffFitError(f"None of the {len(folder.skipped)} image files in {folder.root} could be read.",
                           hint="The files are named above with the reason each one was skipped.")


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


def load_image(path: Path) -> Image.Image:
    """Decode one file to RGB or raise BadImage with the reason."""
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file")
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; treat both as a decompression bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return to_rgb(image)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("larger than Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS)") from None
    except Exception as exc:  # Pillow raises many types for broken files (OSError, SyntaxError, ...)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadImage(f"not a readable image ({reason})") from None


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's center crop: halve with a box filter while the short side is >= 2*size, resize the short
    side to `size` (bicubic), then cut the central size x size square. Returns (size, size, 3) uint8."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> float in [-1, 1], as the reference's Normalize(0.5, 0.5)."""
    return images.float() / 127.5 - 1.0


class ImageDataset(torch.utils.data.Dataset):
    """Item i -> (uint8 (3, R, R) tensor or None, reason or None); never raises for a bad file."""

    def __init__(self, files: list[Path], resolution: int):
        self.files, self.resolution = files, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str | None]:
        try:
            arr = center_crop(load_image(self.files[i]), self.resolution)
        except BadImage as exc:
            return None, str(exc)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1), None


def _as_list(batch: list) -> list:
    return batch


def _image_batches(files: list[Path], resolution: int, batch_size: int, num_workers: int):
    dataset = ImageDataset(files, resolution)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                       collate_fn=_as_list, shuffle=False)


def find_bad_images(folder: ImageFolder, resolution: int, num_workers: int = 0,
                    progress: bool = True) -> dict[Path, str]:
    """Decode every image once; {path: reason} for the ones that cannot be used."""
    bad: dict[Path, str] = {}
    with track(len(folder.files), "Checking images", progress) as advance:
        start = 0
        for batch in _image_batches(folder.files, resolution, 64, num_workers):
            for offset, (_, reason) in enumerate(batch):
                if reason is not None:
                    bad[folder.files[start + offset]] = reason
            start += len(batch)
            advance(len(batch))
    return bad


# --------------------------------------------------------------------------------------------
# Latent cache
# --------------------------------------------------------------------------------------------


def vae_identity(spec: str) -> str:
    """The VAE spec, made specific for a local folder (absolute path, file sizes and mtimes)."""
    path = Path(spec).expanduser()
    if not path.exists():
        return spec
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return f"{path.resolve()}\n" + files_signature(files, path if path.is_dir() else path.parent)


def cache_key(folder: ImageFolder, resolution: int, vae_spec: str) -> str:
    """Hash of what the cached latents depend on: the files (with sizes and mtimes), resolution, VAE."""
    h = hashlib.sha256()
    head = {"format": CACHE_FORMAT, "resolution": resolution, "vae": vae_identity(vae_spec)}
    h.update(json.dumps(head).encode())
    h.update(files_signature(folder.files, folder.root).encode())
    return h.hexdigest()[:32]


@dataclass
class LatentCache:
    """Memory-mapped latent distributions: rows[i] = (plain, flipped) x (mean, std) x (C, h, w), fp16."""

    path: Path
    rows: np.ndarray
    row_of: dict[str, int]
    bad: dict[str, str]
    built: bool  # False when an existing cache was reused

    def take(self, files: list[Path], root: Path) -> np.ndarray:
        """Row numbers of `files` (paths under `root`)."""
        return np.array([self.row_of[str(f.relative_to(root))] for f in files], dtype=np.int64)


def latent_cache(folder: ImageFolder, resolution: int, vae_spec: str, get_vae: Callable[[], object],
                 cache_dir: str | os.PathLike | None = None, batch_size: int = 32,
                 device: torch.device | str = "cpu", num_workers: int = 0,
                 progress: bool = True) -> LatentCache:
    """Open the cache for (files, resolution, VAE), building it first (atomically) if needed.

    `get_vae()` returns the engine.vae.Autoencoder; it is only called when the cache must be built.
    """
    root = Path(cache_dir).expanduser() if cache_dir else user_cache_dir() / "latents"
    path = root / cache_key(folder, resolution, vae_spec)
    built = not (path / "meta.json").exists()
    if built:
        with atomic_path(path) as tmp:
            tmp.mkdir()
            _build_cache(tmp, folder, resolution, get_vae(), batch_size, device, num_workers, progress)
    meta = json.loads((path / "meta.json").read_text())
    rows = np.load(path / "latents.npy", mmap_mode="r")
    return LatentCache(path, rows, {f: i for i, f in enumerate(meta["files"])}, meta["bad"], built)


@torch.no_grad()
def _build_cache(tmp: Path, folder: ImageFolder, resolution: int, vae, batch_size: int, device,
                 num_workers: int, progress: bool) -> None:
    latent = resolution // vae.factor
    shape = (len(folder.files), 2, 2, vae.latent_channels, latent, latent)
    rows = np.lib.format.open_memmap(tmp / "latents.npy", mode="w+", dtype=np.float16, shape=shape)
    bad: dict[str, str] = {}
    start = 0
    with track(len(folder.files), "Encoding latents", progress) as advance:
        for batch in _image_batches(folder.files, resolution, batch_size, num_workers):
            good = [start + i for i, (img, _) in enumerate(batch) if img is not None]
            for i, (_, reason) in enumerate(batch):
                if reason is not None:
                    bad[str(folder.files[start + i].relative_to(folder.root))] = reason
            if good:
                images = to_model_range(torch.stack([batch[i - start][0] for i in good]).to(device))
                mean, std = vae.encode(torch.cat([images, images.flip(-1)]))
                # (2N, C, h, w) x2 -> (N, flip, mean|std, C, h, w)
                out = torch.stack([mean, std], 1).unflatten(0, (2, len(good))).transpose(0, 1)
                rows[good] = out.to("cpu", torch.float16).numpy()
            start += len(batch)
            advance(len(batch))
    rows.flush()
    del rows
    meta = {"format": CACHE_FORMAT, "resolution": resolution, "vae": vae.spec, "shape": list(shape),
            "files": [str(f.relative_to(folder.root)) for f in folder.files], "bad": bad}
    (tmp / "meta.json").write_text(json.dumps(meta))


def sample_latents(rows: torch.Tensor, flips: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Cached rows (N, 2, 2, C, h, w) -> latents: mean + std * noise of the plain or mirrored image."""
    chosen = rows[torch.arange(len(rows)), flips.long()].float()
    return chosen[:, 0] + chosen[:, 1] * noise
