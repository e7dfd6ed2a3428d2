"""Sample folders: the PNG, grid and npz writers, and `sample_to_folder` with its manifest.

`sample.json` in a sample folder lists every file the run wrote. That list is what makes a folder
difffit's: a later run into it (with `--overwrite`) replaces or removes only the files listed there,
so a user's own `000123.png` beside them is never touched. A run holds the folder's lock (the one `fit`
takes), writes sample.json first with "complete": false, removes the earlier run's files, and marks
it complete once every file is written: an interrupted run never passes for a finished one (eval-fid
refuses it), and `--overwrite` replaces it. Prompt samples also record
`prompts`, the prompt of each image in sample order, which `eval-fid --metrics clip` scores the
images against.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from difffit.engine.devices import resolve_device
from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation.options import check_image_count
from difffit.engine.evaluation.sample import SamplingOptions, generate_batches
from difffit.engine.io import LOCK, MARKER, atomic_path, run_lock, write_marker

if TYPE_CHECKING:
    from accelerate import PartialState

    from difffit.engine.models.bases import Base

MANIFEST = "sample.json"
GRID = "grid.png"
GRID_MAX = 64  # grid.png shows at most this many images (the first ones)
SAMPLE_PNG = re.compile(r"(\d{6,})\.png")  # sample i is f"{i:06d}.png"


def read_manifest(folder: Path) -> tuple[set[str], bool] | None:
    """(the files a `sample` run listed in folder/sample.json, whether that run finished); None if it is
    not such a folder. A manifest without "complete" is finished: older versions wrote it last."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files, complete = manifest["files"], manifest.get("complete", True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(files, list):
        return None
    return {f for f in map(str, files) if Path(f).name == f}, complete is True  # plain names: nothing outside


def finished_manifest(folder: Path) -> set[str] | None:
    """The files a finished `sample` run listed in folder/sample.json; None if it is not such a folder. An
    unfinished run is refused: its files are a mix of two runs."""
    manifest = read_manifest(folder)
    if manifest is not None and not manifest[1]:
        raise DiffFitError(
            f"{folder} holds an unfinished `difffit sample` run (interrupted, or still running).",
            hint="Let it finish, or sample again with --overwrite.",
        )
    return None if manifest is None else manifest[0]


def sample_images(folder: Path) -> list[Path] | None:
    """The samples of a `difffit sample` folder in sample order (not its grid, nor a user's file beside them);
    None for any other folder; an unfinished run is refused."""
    listed = finished_manifest(folder)
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


def check_sample_folder(folder: Path, planned: Sequence[str], overwrite: bool) -> set[str]:
    """Refuse a folder holding anything difffit did not write; returns the files of an earlier run in it
    (finished or not), which this run replaces or removes."""
    if folder.exists() and not folder.is_dir():
        raise DiffFitError(f"--out {folder} is an existing file; samples need a folder.", hint="Choose a new --out.")
    existing = {p.name for p in folder.iterdir()} - {MARKER, LOCK} if folder.is_dir() else set()
    if not existing:
        return set()
    manifest = read_manifest(folder)
    if manifest is None:
        raise DiffFitError(
            f"--out {folder} already holds files that `difffit sample` did not write.",
            hint="Choose a new or empty folder.",
        )
    listed, complete = manifest
    if not overwrite:
        raise DiffFitError(
            f"{folder} already holds samples{'' if complete else ' of an unfinished run'}.",
            hint="Add --overwrite to replace them.",
        )
    foreign = sorted((set(planned) & existing) - listed)
    if foreign:
        raise DiffFitError(
            f"{folder / foreign[0]} is not one of difffit's samples; it is left as it is.", hint="Choose another --out."
        )
    return listed & existing


def start_sample_folder(folder: Path, planned: Sequence[str], overwrite: bool, settings: dict) -> None:
    """Under the run's lock: mark the folder unfinished (its manifest lists this run's files and the earlier
    run's, so an interrupted run can be replaced with --overwrite), then remove the earlier run's files, so
    the folder never mixes two runs."""
    earlier = check_sample_folder(folder, planned, overwrite)  # again: another run may have finished meanwhile
    write_marker(folder, "samples")
    write_manifest(folder, settings | {"files": sorted(earlier | set(planned)), "complete": False})
    for name in sorted(earlier - {MANIFEST}):
        (folder / name).unlink(missing_ok=True)


def write_manifest(folder: Path, settings: dict) -> None:
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps(settings, indent=2, default=str, allow_nan=False) + "\n")


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


def save_npz(images: torch.Tensor | np.ndarray | Sequence[Path], path: str | Path) -> Path:
    """`arr_0` = N x H x W x 3 uint8, the layout OpenAI's ADM evaluator reads, as `np.savez` writes it. `images`: an
    array, or PNG files read and written one at a time (the memory of one image, however many there are)."""
    from PIL import Image

    if isinstance(images, torch.Tensor | np.ndarray):
        array = _as_numpy(images)
        rows, shape = iter(array), array.shape
    else:
        first = np.asarray(Image.open(images[0]).convert("RGB"))
        rows = (np.asarray(Image.open(p).convert("RGB")) for p in images)
        shape = (len(images), *first.shape)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    path = Path(path)
    with (
        atomic_path(path) as tmp,
        zipfile.ZipFile(tmp, "w", allowZip64=True) as archive,
        archive.open("arr_0.npy", "w", force_zip64=True) as member,
    ):
        np.lib.format.write_array_header_1_0(member, header)
        for row in rows:
            if row.shape != shape[1:]:
                raise DiffFitError(f"The samples of {path.parent} differ in size ({row.shape} and {shape[1:]}).")
            member.write(np.ascontiguousarray(row, dtype=np.uint8).tobytes())
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
    state: PartialState | None = None,
    progress: bool = True,
    record: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Samples 0..n-1 -> folder/000000.png ..., grid.png (first 64), sample.json and, with npz, samples.npz.

    `state` (an accelerate PartialState) shards the indices over processes; each writes its own
    PNGs and the main process gathers them into the grid and the npz. sample.json records the base,
    `record` (e.g. the source and its adapter metadata), n, the classes or each sample's prompt, `options`,
    the files this run wrote (a later run into the same folder, with `overwrite`, removes only those) and
    whether it finished. Returns a summary.
    """
    check_image_count("-n", n)
    options = options.for_base(base)
    folder = Path(folder)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    device = state.device if state is not None else resolve_device(options.device)
    is_main = rank == 0
    planned = [f"{i:06d}.png" for i in range(n)] + [GRID, MANIFEST] + (["samples.npz"] if npz else [])
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
    }
    with contextlib.ExitStack() as held:
        if is_main:
            # Foreign files are refused before the lock (which would leave a file there); the rest under it,
            # so a run into a folder in use hears that first.
            check_sample_folder(folder, planned, overwrite=True)
            held.enter_context(run_lock(folder))  # the same lock as fit: a second run into it is refused
            start_sample_folder(folder, planned, overwrite, settings)
        if state is not None:
            state.wait_for_everyone()
        start = time.perf_counter()
        batches = generate_batches(
            base,
            shard(n, rank, world),
            options,
            classes=classes,
            prompts=prompts,
            device=device,
            progress=progress and is_main,
        )
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
        summary["grid"] = str(save_grid(load_pngs(pngs[:GRID_MAX]), folder / GRID))
        if npz:
            summary["npz"] = str(save_npz(pngs, folder / "samples.npz"))  # streamed: one image in memory at a time
        write_manifest(folder, settings | {"files": planned, "complete": True})
    return summary
