"""Sample folders: the PNG, grid and npz writers, and `sample_to_folder` with its manifest.

`sample.json` in a sample folder lists every file the run wrote. That list is what makes a folder
difffit's: a later run into it (with `--overwrite`) replaces or removes only the files listed there,
so a user's own `000123.png` beside them is never touched. Prompt samples also record `prompts`, the
prompt of each image in sample order, which `eval-fid --metrics clip` scores the images against.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from difffit_cli.engine.devices import resolve_device
from difffit_cli.engine.errors import DiffFitError
from difffit_cli.engine.evaluation.sample import SamplingOptions, generate_batches
from difffit_cli.engine.io import MARKER, atomic_path, write_marker

if TYPE_CHECKING:
    from difffit_cli.engine.models.bases import Base

MANIFEST = "sample.json"
GRID_MAX = 64  # grid.png shows at most this many images (the first ones)
SAMPLE_PNG = re.compile(r"(\d{6,})\.png")  # sample i is f"{i:06d}.png"


def read_manifest(folder: Path) -> set[str] | None:
    """The files an earlier `sample` run listed in folder/sample.json; None if it is not such a folder."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, list):
        return None
    return {f for f in map(str, files) if Path(f).name == f}  # plain names only: nothing outside the folder


def sample_images(folder: Path) -> list[Path] | None:
    """The samples of a `difffit sample` folder in sample order (not its grid); None for any other folder."""
    listed = read_manifest(folder)
    if listed is None:
        return None
    numbered = {int(m.group(1)): name for name in listed if (m := SAMPLE_PNG.fullmatch(name))}
    return [folder / numbered[i] for i in sorted(numbered)]


def sample_prompts(folder: Path) -> list[str] | None:
    """The prompt of each sample (sample.json's `prompts`, in sample order), or None when it records none."""
    try:
        prompts = json.loads((folder / MANIFEST).read_text()).get("prompts")
    except (OSError, ValueError, AttributeError):
        return None
    return prompts if isinstance(prompts, list) and all(isinstance(p, str) for p in prompts) else None


def prepare_sample_folder(folder: Path, planned: Sequence[str], overwrite: bool) -> None:
    """Make `folder` ready for this run's files, refusing to touch anything difffit did not write."""
    if folder.exists() and not folder.is_dir():
        raise DiffFitError(f"--out {folder} is an existing file; samples need a folder.", hint="Choose a new --out.")
    existing = {p.name for p in folder.iterdir()} - {MARKER} if folder.is_dir() else set()
    if existing:
        listed = read_manifest(folder)
        if listed is None:
            raise DiffFitError(f"--out {folder} already holds files that `difffit sample` did not write.",
                               hint="Choose a new or empty folder.")
        if not overwrite:
            raise DiffFitError(f"{folder} already holds samples.", hint="Add --overwrite to replace them.")
        foreign = sorted((set(planned) & existing) - listed)
        if foreign:
            raise DiffFitError(f"{folder / foreign[0]} is not one of difffit's samples; it is left as it is.",
                               hint="Choose another --out.")
        for name in sorted(listed - set(planned)):  # an earlier, larger run's surplus (and a stale npz)
            (folder / name).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    write_marker(folder, "samples")


# -- writers --------------------------------------------------------------------------------------


def _as_numpy(images: torch.Tensor | np.ndarray) -> np.ndarray:
    array = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {array.dtype} {array.shape}")
    return array


def save_pngs(images: torch.Tensor | np.ndarray, folder: str | Path, start: int = 0) -> list[Path]:
    """images[i] -> folder/{start + i:06d}.png, each written atomically (eval-fid reads them later)."""
    from PIL import Image

    folder = Path(folder)
    paths = []
    for i, image in enumerate(_as_numpy(images)):
        path = folder / f"{start + i:06d}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        paths.append(path)
    return paths


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path) -> Path:
    """A near-square grid, ceil(sqrt(n)) columns, row-major, unused cells black."""
    from PIL import Image

    array = _as_numpy(images)
    n, h, w, _ = array.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, image in enumerate(array):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return path


def save_npz(images: torch.Tensor | np.ndarray, path: str | Path) -> Path:
    """`arr_0` = N x H x W x 3 uint8, the layout OpenAI's ADM evaluator reads."""
    array = _as_numpy(images)
    path = Path(path)
    with (
        atomic_path(path) as tmp,
        open(tmp, "wb") as f,
    ):  # a file object: np.savez would append ".npz" to a name
        np.savez(f, arr_0=array)
    return path


def load_pngs(paths: Sequence[str | Path]) -> np.ndarray:
    """PNG files -> uint8 (N, H, W, 3), filled into one preallocated array (50k images fit once)."""
    from PIL import Image

    out = None
    for i, path in enumerate(paths):
        image = np.asarray(Image.open(path).convert("RGB"))
        if out is None:
            out = np.empty((len(paths), *image.shape), dtype=np.uint8)
        out[i] = image
    return out


# -- a whole run into a folder --------------------------------------------------------------------


def shard(n: int, rank: int, world: int) -> range:
    """The contiguous block of sample indices process `rank` of `world` generates."""
    size = math.ceil(n / world)
    return range(min(n, rank * size), min(n, (rank + 1) * size))


def sample_to_folder(
    base: Base,
    folder: str | Path,
    n: int,
    options: SamplingOptions,
    *,
    classes: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    npz: bool = False,
    state=None,
    progress: bool = True,
    record: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Samples 0..n-1 -> folder/000000.png ..., grid.png (first 64), sample.json and, with npz, samples.npz.

    `state` (an accelerate PartialState) shards the indices over processes; each writes its own
    PNGs and the main process gathers them into the grid and the npz. sample.json records the base,
    `record` (e.g. the source and its adapter metadata), n, the classes or each sample's prompt, `options`
    and the files this run wrote: a later run into the same folder (with `overwrite`) removes only those.
    Returns a summary.
    """
    if n < 1:
        raise DiffFitError(f"-n must be at least 1 (got {n}).")
    options = options.for_base(base)
    folder = Path(folder)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    device = state.device if state is not None else resolve_device(options.device)
    is_main = rank == 0
    planned = [f"{i:06d}.png" for i in range(n)] + ["grid.png", MANIFEST] + (["samples.npz"] if npz else [])
    if is_main:
        prepare_sample_folder(folder, planned, overwrite)
    if state is not None:
        state.wait_for_everyone()
    start = time.perf_counter()
    batches = generate_batches(base, shard(n, rank, world), options, classes=classes, prompts=prompts, device=device,
                               progress=progress and is_main)
    for batch, images in batches:
        save_pngs(images, folder, start=batch[0])
    if state is not None:
        state.wait_for_everyone()
    seconds = time.perf_counter() - start
    summary = {
        "dir": str(folder),
        "images": n,
        "seconds": round(seconds, 3),
        "images_per_second": round(n / seconds, 3),
    }
    if not is_main:
        return summary
    pngs = [folder / f"{i:06d}.png" for i in range(n)]
    summary["grid"] = str(save_grid(load_pngs(pngs[:GRID_MAX]), folder / "grid.png"))
    if npz:
        summary["npz"] = str(save_npz(load_pngs(pngs), folder / "samples.npz"))
    settings = {
        **(record or {}),
        "base": base.spec,
        "base_fingerprint": base.fingerprint,
        "vae": base.vae_spec,
        "n": n,
        "classes": list(classes) if classes is not None else None,
        **({"prompts": [prompts[i % len(prompts)] for i in range(n)]} if prompts else {}),
        **options.to_dict(),
        "device": str(device),
        "dtype": str(options.dtype),
        "files": planned,
    }
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps(settings, indent=2, default=str, allow_nan=False) + "\n")
    return summary
