"""Latents for training: the VAE's latent *distribution* (mean, std) of each image and its mirror.

Training draws `mean + std * noise`. The cache stores the distribution once per image (plain and
mirrored, fp16, memory-mapped) so later runs never run the VAE; `EncodedLatents` encodes on the fly
(`--no-cache-latents`, the reference behaviour). Both draw from the same distribution through the
same `draw_latents`.

A cache holds one crop size: the square of a resolution (the reference crop), or one aspect-ratio
bucket's width x height (`engine.data.buckets`, keyed apart from the square, so the two never mix).

The cache is checked when a run opens it: its `meta.json` records a checksum of `latents.npy`, so
values overwritten in place, a truncated file or a broken `meta.json` are named on stderr and the
cache is rebuilt. Latents the VAE returns as NaN or inf mark that image as unusable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from difffit.engine.data.cache_files import cache_build, file_checksum, remove_stale_builds, require_free_space
from difffit.engine.data.images import (
    ImageDataset,
    ImageFolder,
    Size,
    as_size,
    find_bad_images,
    image_batches,
    to_model_range,
)
from difffit.engine.io import files_signature, user_cache_dir
from difffit.engine.models.vae import Autoencoder
from difffit.engine.progress import say, track

CACHE_FORMAT = 2  # 2: meta.json records a checksum of latents.npy


def vae_identity(spec: str) -> str:
    """The VAE spec, made specific for a local folder (absolute path, file sizes and mtimes)."""
    path = Path(spec).expanduser()
    if not path.exists():
        return spec
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return f"{path.resolve()}\n" + files_signature(files, path if path.is_dir() else path.parent)


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """The latent cache's folder: --cache-dir, else <user cache>/latents. Text embeddings live beside the
    latents, in its `text` sub-folder (engine.data.text_cache)."""
    return Path(cache_dir).expanduser() if cache_dir else user_cache_dir() / "latents"


def cache_key(folder: ImageFolder, size: int | Size, vae_spec: str) -> str:
    """Hash of what the cached latents depend on: the files (with sizes and mtimes) or the dataset
    fingerprint and rows, the crop (a square's side, or a bucket's (width, height)), the VAE."""
    h = hashlib.sha256()
    crop = {"resolution": size} if isinstance(size, int) else {"bucket": list(size)}
    head = {"format": CACHE_FORMAT, **crop, "vae": vae_identity(vae_spec)}
    h.update(json.dumps(head).encode())
    h.update(folder.signature().encode())
    return h.hexdigest()[:32]


@dataclass
class LatentCache:
    """Memory-mapped latent distributions: rows[i] = (plain, flipped) x (mean, std) x (C, h, w), fp16."""

    path: Path
    rows: np.ndarray
    row_of: dict[str, int]
    bad: dict[str, str]
    built: bool  # False when an existing cache was reused

    def take(self, folder: ImageFolder) -> np.ndarray:
        """Cache rows of the folder's items."""
        return np.array([self.row_of[folder.key(item)] for item in folder.files], dtype=np.int64)


def latent_cache(
    folder: ImageFolder,
    size: int | Size,
    vae_spec: str,
    get_vae: Callable[[], Autoencoder],
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> LatentCache:
    """Open the cache for (files, crop size, VAE), building it first (atomically) if needed.

    `get_vae()` returns the engine.models.vae.Autoencoder; it is only called when the cache must be built.
    A damaged cache is named on stderr and rebuilt.
    """
    root = cache_root(cache_dir)
    remove_stale_builds(root)
    path = root / cache_key(folder, size, vae_spec)
    opened, built = None, False
    if path.exists():
        opened, problem = _open_checked(path)
        if opened is None:
            say((f"The latent cache {path} is damaged ({problem}); rebuilding it.", "yellow"))
    if opened is None:
        with cache_build(path, option="--cache-dir") as tmp:
            _build_cache(tmp, folder, size, get_vae(), batch_size, device, num_workers, progress)
        opened, problem = _open_checked(path)
        if opened is None:  # only a concurrent writer or a failing disk gets here
            raise OSError(f"the latent cache {path} just written cannot be read back ({problem})")
        built = True
    rows, meta = opened
    return LatentCache(path, rows, {f: i for i, f in enumerate(meta["files"])}, meta["bad"], built)


def _open_checked(path: Path) -> tuple[tuple[np.ndarray, dict] | None, str]:
    """((rows, meta), "") for an intact cache, else (None, what is wrong)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != CACHE_FORMAT or "checksum" not in meta:
            return None, "written by another difffit version"
        if file_checksum(path / "latents.npy") != meta["checksum"]:
            return None, "latents.npy does not match its checksum"
        rows = np.load(path / "latents.npy", mmap_mode="r")
        if list(rows.shape) != meta["shape"]:
            return None, "latents.npy has the wrong shape"
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        return None, f"{type(exc).__name__}: {exc}"
    return (rows, meta), ""


def encode_distribution(vae: Autoencoder, images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 3, H, W) on the VAE's device -> (N, mean|std, C, h, w) float."""
    mean, std = vae.encode(to_model_range(images))
    return torch.stack([mean.float(), std.float()], 1)


@torch.no_grad()
def _build_cache(
    tmp: Path,
    folder: ImageFolder,
    size: int | Size,
    vae: Autoencoder,
    batch_size: int,
    device: torch.device | str,
    num_workers: int,
    progress: bool,
) -> None:
    width, height = as_size(size)
    shape = (len(folder.files), 2, 2, vae.latent_channels, height // vae.factor, width // vae.factor)
    what = "Encoding latents" if isinstance(size, int) else f"Encoding latents ({width} x {height} bucket)"
    bad: dict[str, str] = {}
    start = 0
    with _rows_file(tmp / "latents.npy", shape) as rows_file, track(len(folder.files), what, progress) as advance:
        for batch in image_batches(folder, size, batch_size, num_workers):
            for i, (_, reason) in enumerate(batch):
                if reason is not None:
                    bad[folder.key(folder.files[start + i])] = reason
            rows = np.zeros((len(batch), *shape[1:]), dtype=np.float16)  # an unreadable image's row stays 0
            good = [i for i, (img, _) in enumerate(batch) if img is not None]
            if good:
                images = torch.stack([batch[i][0] for i in good]).to(device)
                # (2N, 2, C, h, w) -> (N, flip, mean|std, C, h, w)
                out = encode_distribution(vae, torch.cat([images, images.flip(-1)])).unflatten(0, (2, len(good)))
                out = out.transpose(0, 1).to("cpu", torch.float16)
                finite = torch.isfinite(out).flatten(1).all(1)
                for i, ok in zip(good, finite.tolist(), strict=True):
                    if not ok:
                        bad[folder.key(folder.files[start + i])] = "the VAE encodes it to NaN or inf"
                rows[good] = out.numpy()
            rows_file.write(rows.tobytes())
            start += len(batch)
            advance(len(batch))
    meta = {
        "format": CACHE_FORMAT,
        "size": [width, height],
        "vae": vae.spec,
        "shape": list(shape),
        "files": [folder.key(item) for item in folder.files],
        "bad": bad,
        "checksum": file_checksum(tmp / "latents.npy"),
    }
    (tmp / "meta.json").write_text(json.dumps(meta))


def _rows_file(path: Path, shape: tuple[int, ...]) -> BinaryIO:
    """latents.npy (fp16 rows of `shape`), open to write its rows in order after the header.

    Written through the file, not a memory map (np.lib.format.open_memmap): on a full disk a write to a
    map is a Bus error that kills the process with nothing said and its temporary folder left, where a
    file write is an OSError (ENOSPC) that atomic_path turns into one sentence, removing the folder. The
    free space is checked first, so a disk too small fails before any image is encoded.
    """
    require_free_space(
        path.parent,
        math.prod(shape) * np.dtype(np.float16).itemsize,
        "latent cache",
        hint="Free some space, or put the cache elsewhere with --cache-dir (or --no-cache-latents).",
    )
    rows_file = open(path, "wb")  # noqa: SIM115 - the caller closes it
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(rows_file, header)
    return rows_file


def draw_latents(distribution: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """(N, mean|std, C, h, w) and noise (N, C, h, w) -> latents mean + std * noise, in float32."""
    distribution = distribution.float()
    return distribution[:, 0] + distribution[:, 1] * noise


def draw_cached_latents(rows: torch.Tensor, flips: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Cached rows (N, 2, 2, C, h, w) -> latents of the plain or mirrored image (flips: 0 or 1 each)."""
    return draw_latents(rows[torch.arange(len(rows)), flips.long()], noise)


def usable_latents(
    folder: ImageFolder,
    size: int | Size,
    vae_spec: str,
    vae: Callable[..., Autoencoder],
    *,
    cache: bool,
    cache_dir: str | os.PathLike | None,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    progress: bool,
) -> tuple[ImageFolder, CachedLatents | EncodedLatents]:
    """The folder without its unusable images, and latents for the rest, cropped to `size` (a square's side
    or a bucket's (width, height)): from the latent cache (built first if needed), or, without `cache`,
    encoded on the fly. `vae(device[, dtype])` gives the VAE."""
    if cache:
        opened = latent_cache(
            folder, size, vae_spec, lambda: vae(device), cache_dir, batch_size, device, num_workers, progress
        )
        folder = folder.without(folder.by_key(opened.bad))
        return folder, CachedLatents(opened, folder)
    folder = folder.without(find_bad_images(folder, size, num_workers, progress))
    return folder, EncodedLatents(folder, size, vae(device, torch.float32))


class CachedLatents:
    """Training latents read from a `LatentCache` (memory-mapped rows, then to the device)."""

    def __init__(self, cache: LatentCache, folder: ImageFolder):
        self.cache = cache
        self.rows = torch.from_numpy(cache.take(folder))
        self.cache_path: Path | None = cache.path

    def shape(self, index: torch.Tensor) -> tuple[int, ...]:
        """The latents' (C, h, w) (the same for every item)."""
        return tuple(self.cache.rows.shape[-3:])

    def draw(self, index: torch.Tensor, flips: torch.Tensor, noise: torch.Tensor, device: torch.device) -> torch.Tensor:
        rows = torch.from_numpy(np.ascontiguousarray(self.cache.rows[self.rows[index].numpy()]))
        return draw_cached_latents(rows.to(device), flips.to(device), noise.to(device))


class EncodedLatents:
    """Training latents encoded on the fly, every step (`--no-cache-latents`)."""

    cache_path = None

    def __init__(self, folder: ImageFolder, size: int | Size, vae: Autoencoder):
        self.dataset, self.vae = ImageDataset(folder, size), vae

    def shape(self, index: torch.Tensor) -> tuple[int, ...]:
        """The latents' (C, h, w) (the same for every item)."""
        width, height = self.dataset.size
        return self.vae.latent_channels, height // self.vae.factor, width // self.vae.factor

    @torch.no_grad()
    def draw(self, index: torch.Tensor, flips: torch.Tensor, noise: torch.Tensor, device: torch.device) -> torch.Tensor:
        images = torch.stack([self.dataset[i][0] for i in index.tolist()]).to(device)
        images = torch.where(flips.to(device).view(-1, 1, 1, 1).bool(), images.flip(-1), images)
        return draw_latents(encode_distribution(self.vae, images), noise.to(device))
