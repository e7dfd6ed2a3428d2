"""Text embeddings for text-to-image training: each unique caption encoded once, cached beside the latents.

`encode(captions)` maps a batch of captions to a dict of tensors whose leading dim is the batch
(PixArt: prompt_embeds [B, L, D] and prompt_attention_mask [B, L]; SD3 and FLUX add pooled outputs of
several encoders). The cache is generic over the dict's names, so every family uses the same one.

On disk, `cache_dir/<hash of the key and dtype>/` holds shards: folders written atomically by one
run each, with `meta.json` (the key, the captions, each tensor's file, dtype and CRC-32) and one
`.npy` per tensor name, rows aligned with the captions, memory-mapped when read. A run encodes only
the captions no intact shard holds and writes them as a new shard, so editing one caption of a large
dataset costs one encode, not the whole dataset's (T5-XXL encodes a few hundred captions a second on a
GPU; hours for a large dataset on a CPU). Shards of captions the data has dropped stay until the cache
folder is removed; they are only read for their index.

A shard is checked when opened; a damaged one (checksum, truncation, broken meta) is named on stderr,
removed and its captions encoded again. If the encoder returns tensors of another shape or dtype than
the shards under its key hold, those shards are out of date: named, removed, and everything is encoded
again.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difffit.engine.data.cache_files import cache_build, file_checksum, remove_stale_builds, require_free_space
from difffit.engine.data.latents import cache_root
from difffit.engine.errors import DiffFitError
from difffit.engine.progress import say, track

TEXT_FORMAT = 1
SHARD_NAME = re.compile(r"[0-9a-f]{32}")
# dtypes numpy lacks are stored as the integer of the same width, bit for bit
_STORED_AS = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}

Encode = Callable[[list[str]], dict[str, torch.Tensor]]


def text_cache_dir(cache_dir: str | None) -> Path:
    """Where text embeddings are cached: the `text` folder beside the latents (--cache-dir or the default)."""
    return cache_root(cache_dir) / "text"


@dataclass
class Shard:
    """Embeddings of some captions: arrays[name][i] belongs to captions[i] (memory-mapped when on disk)."""

    captions: list[str]
    arrays: dict[str, np.ndarray]
    dtypes: dict[str, torch.dtype]
    path: Path | None = None

    def spec(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """What must agree between shards: each tensor's dtype and shape after the leading dim."""
        return {name: (str(self.dtypes[name]), tuple(a.shape[1:])) for name, a in self.arrays.items()}


class TextEmbeddings:
    """The embeddings of each unique caption, stored once, and the caption of each image (`rows`)."""

    def __init__(self, captions: list[str], rows: torch.Tensor, shards: list[Shard], encoded: int, path: Path | None):
        self.captions = captions  # unique captions; rows[i] is the index of image i's caption here
        self.rows = rows
        self.encoded = encoded  # how many captions `encode` saw in this run (0: all came from the cache)
        self.path = path  # the cache folder, or None for embeddings held in memory only
        self.index = {caption: i for i, caption in enumerate(captions)}
        where = {}
        for s, shard in reversed(list(enumerate(shards))):  # the first shard holding a caption wins
            where.update({caption: (s, r) for r, caption in enumerate(shard.captions)})
        self.shards = shards
        self.location = torch.tensor([where[c] for c in captions], dtype=torch.long).view(-1, 2)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The embeddings of images `indices`: a batch on the CPU, leading dim len(indices)."""
        return self._gather(self.rows[torch.as_tensor(indices, dtype=torch.long).cpu()])

    def of(self, caption: str) -> dict[str, torch.Tensor]:
        """The embeddings of one caption (e.g. "" for caption dropout) as a batch of one."""
        if caption not in self.index:
            raise KeyError(f"{caption!r} was not encoded: pass it to text_embeddings(..., extra=[...])")
        return self._gather(torch.tensor([self.index[caption]]))

    def of_each(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """The embeddings of each of `captions` (every one encoded, e.g. as `extra`), a batch of len(captions)."""
        missing = next((caption for caption in captions if caption not in self.index), None)
        if missing is not None:
            raise KeyError(f"{missing!r} was not encoded: pass it to text_embeddings(..., extra=[...])")
        return self._gather(torch.tensor([self.index[caption] for caption in captions], dtype=torch.long))

    def _gather(self, unique: torch.Tensor) -> dict[str, torch.Tensor]:
        shard_of, row_of = self.location[unique].unbind(1)
        dtypes = self.shards[0].dtypes
        # Not pinned: each batch is a fresh tensor, and pinning it would cost a page-locked allocation
        # per step, more than an asynchronous copy of a few MB saves.
        if bool((shard_of == shard_of[0]).all()):  # the usual case: one shard holds the whole batch
            rows = row_of.numpy()
            return {name: _to_torch(a[rows], dtypes[name]) for name, a in self.shards[int(shard_of[0])].arrays.items()}
        out = {
            name: torch.empty((len(unique), *a.shape[1:]), dtype=dtypes[name])
            for name, a in self.shards[0].arrays.items()
        }
        for s in shard_of.unique().tolist():
            positions = (shard_of == s).nonzero().squeeze(1)
            rows = row_of[positions].numpy()
            for name, array in self.shards[s].arrays.items():
                out[name].index_copy_(0, positions, _to_torch(array[rows], dtypes[name]))
        return out


def text_embeddings(
    captions: Sequence[str],
    encode: Encode,
    *,
    key: str,
    cache_dir: Path | None,
    batch_size: int = 32,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    extra: Sequence[str] = (),
) -> TextEmbeddings:
    """Embeddings of `captions` (one per image) and of `extra` (e.g. "" or validation prompts).

    `key` names everything the embeddings depend on besides the caption: the encoder's id or path,
    its fingerprint, the token count, and its dtype when `dtype` is None. `dtype` stores floating
    tensors in that dtype (bf16 halves T5-XXL's); None keeps the encoder's. `cache_dir` None: in memory.
    """
    unique = list(dict.fromkeys([*captions, *extra]))
    if not unique:
        raise ValueError("no captions to encode")
    index = {caption: i for i, caption in enumerate(unique)}
    rows = torch.tensor([index[c] for c in captions], dtype=torch.long)
    if cache_dir is None:
        shard = _encode(unique, encode, batch_size, dtype, progress, None)
        return TextEmbeddings(unique, rows, [shard], len(unique), None)
    folder = Path(cache_dir).expanduser() / _folder_name(key, dtype)
    remove_stale_builds(folder)
    shards = _open_shards(folder, key)
    held = {c for shard in shards for c in shard.captions}
    todo = [c for c in unique if c not in held]
    encoded = len(todo)
    if todo:
        # One batch first: its form tells whether the shards on disk still match this encoder.
        first = _encode(todo[:batch_size], encode, batch_size, dtype, False, None)
        if shards and first.spec() != shards[0].spec():
            _discard(shards, "out of date", f"it holds {shards[0].spec()}; the encoder now gives {first.spec()}")
            shards, encoded, done = [], len(unique), set(first.captions)
            todo = first.captions + [c for c in unique if c not in done]
        shards.append(_write_shard(folder, key, todo, encode, batch_size, dtype, progress, first))
    return TextEmbeddings(unique, rows, shards, encoded, folder)


def _folder_name(key: str, dtype: torch.dtype | None) -> str:
    head = {"format": TEXT_FORMAT, "key": key, "dtype": str(dtype) if dtype is not None else "as encoded"}
    return hashlib.sha256(json.dumps(head).encode()).hexdigest()[:32]


# -- encoding ----------------------------------------------------------------------------------------


@torch.no_grad()
def _encode(
    captions: list[str],
    encode: Encode,
    batch_size: int,
    dtype: torch.dtype | None,
    progress: bool,
    folder: Path | None,
    first: Shard | None = None,
) -> Shard:
    """Encode `captions` in batches into arrays in memory, or memory-mapped .npy files in `folder`.
    `first`, when given, holds the already encoded first batch."""
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, torch.dtype] = {}
    with track(len(captions), "Encoding captions", progress) as advance:
        for start in range(0, len(captions), batch_size):
            batch = captions[start : start + batch_size]
            if start == 0 and first is not None:
                out = {name: _to_torch(a, first.dtypes[name]) for name, a in first.arrays.items()}
            else:
                out = _checked(encode(batch), batch, dtype)
            if not arrays:
                dtypes = {name: t.dtype for name, t in out.items()}
                shapes = {name: (len(captions), *t.shape[1:]) for name, t in out.items()}
                if folder is not None:  # the shard is memory-mapped: a full disk must fail before the first write
                    require_free_space(
                        folder,
                        sum(math.prod(shapes[n]) * t.element_size() for n, t in out.items()),
                        "text-embedding cache",
                        hint="Free some space, or put the cache elsewhere with --cache-dir.",
                    )
                arrays = {name: _allocate(folder, i, shapes[name], t.dtype) for i, (name, t) in enumerate(out.items())}
            _check_same_form(out, arrays, dtypes)
            for name, tensor in out.items():
                arrays[name][start : start + len(batch)] = _to_numpy(tensor)
            advance(len(batch))
    return Shard(captions, arrays, dtypes)


def _checked(out, batch: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """encode()'s output for `batch`, checked, on the CPU, floating tensors in `dtype`."""
    if not isinstance(out, dict) or not out or not all(isinstance(t, torch.Tensor) for t in out.values()):
        raise TypeError("encode must return a non-empty dict of tensors")
    checked = {}
    for name, tensor in out.items():
        if tensor.dim() == 0 or len(tensor) != len(batch):
            raise ValueError(
                f"encode returned {name} of shape {tuple(tensor.shape)} for {len(batch)} captions; "
                "the leading dim must be the batch"
            )
        if tensor.is_floating_point():
            bad = ~torch.isfinite(tensor.float()).flatten(1).all(1)
            if bad.any():
                caption = batch[int(bad.nonzero()[0])]
                raise DiffFitError(
                    f"The text encoder gives NaN or inf for the caption {caption[:80]!r}.",
                    hint="A T5 encoder in float16 overflows; run it in bfloat16 or float32.",
                )
            tensor = tensor.to(dtype or tensor.dtype)
        checked[name] = tensor.detach().cpu()
    return checked


def _check_same_form(
    out: dict[str, torch.Tensor], arrays: dict[str, np.ndarray], dtypes: dict[str, torch.dtype]
) -> None:
    """Every batch must give the same tensors: a caller bug (e.g. padding to the longest caption) otherwise."""
    if set(out) != set(arrays):
        raise ValueError(f"encode returned {sorted(out)} after {sorted(arrays)}")
    for name, tensor in out.items():
        if tensor.shape[1:] != arrays[name].shape[1:] or tensor.dtype != dtypes[name]:
            raise ValueError(
                f"encode returned {name} {tuple(tensor.shape)} {tensor.dtype} after "
                f"{tuple(arrays[name].shape[1:])} {dtypes[name]} per caption; pad every batch to "
                "one token count"
            )


def _allocate(folder: Path | None, i: int, shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
    if folder is None:
        return np.empty(shape, _numpy_dtype(dtype))
    # Files are numbered: tensor names may hold characters a file name cannot.
    return np.lib.format.open_memmap(folder / f"{i}.npy", mode="w+", dtype=_numpy_dtype(dtype), shape=shape)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype a tensor of `dtype` is stored as (TypeError for what is not a tensor dtype)."""
    return torch.empty(0, dtype=_STORED_AS.get(dtype, dtype)).numpy().dtype


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.view(_STORED_AS.get(tensor.dtype, tensor.dtype)).numpy()


def _to_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).view(dtype)


# -- shards on disk ----------------------------------------------------------------------------------


def _write_shard(
    folder: Path,
    key: str,
    captions: list[str],
    encode: Encode,
    batch_size: int,
    dtype: torch.dtype | None,
    progress: bool,
    first: Shard,
) -> Shard:
    """Encode `captions` straight into a new shard (atomically), then open it as any later run will."""
    path = folder / uuid.uuid4().hex
    with cache_build(path) as tmp:
        shard = _encode(captions, encode, batch_size, dtype, progress, tmp, first)
        tensors = {}
        for i, (name, array) in enumerate(shard.arrays.items()):
            array.flush()
            tensors[name] = {
                "file": f"{i}.npy",
                "dtype": str(shard.dtypes[name]).removeprefix("torch."),
                "checksum": file_checksum(tmp / f"{i}.npy"),
            }
        del shard
        meta = {"format": TEXT_FORMAT, "key": key, "captions": captions, "tensors": tensors}
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))
    opened, problem = _open_shard(path, key)
    if opened is None:  # only a concurrent writer or a failing disk gets here
        raise OSError(f"the text-embedding cache {path} just written cannot be read back ({problem})")
    return opened


def _open_shards(folder: Path, key: str) -> list[Shard]:
    """The intact shards of a cache folder, all of one form; damaged ones are named, removed, re-encoded."""
    shards = []
    paths = sorted(p for p in folder.iterdir() if SHARD_NAME.fullmatch(p.name)) if folder.is_dir() else []
    for path in paths:
        shard, problem = _open_shard(path, key)
        if shard is not None and shards and shard.spec() != shards[0].spec():
            shard, problem = None, "its tensors differ from the other shards'"
        if shard is None:
            _discard([Shard([], {}, {}, path)], "damaged", problem)
        else:
            shards.append(shard)
    return shards


def _open_shard(path: Path, key: str) -> tuple[Shard | None, str]:
    """(shard, "") for an intact shard, else (None, what is wrong)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != TEXT_FORMAT or meta.get("key") != key:
            return None, "written by another difffit version"
        captions, arrays, dtypes = meta["captions"], {}, {}
        for name, info in meta["tensors"].items():
            file = path / info["file"]
            if file.parent != path or file_checksum(file) != info["checksum"]:
                return None, f"{info['file']} does not match its checksum"
            arrays[name] = np.load(file, mmap_mode="r")
            dtypes[name] = getattr(torch, info["dtype"])
            if len(arrays[name]) != len(captions) or arrays[name].dtype != _numpy_dtype(dtypes[name]):
                return None, f"{info['file']} does not match its record in meta.json"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        return None, f"{type(exc).__name__}: {exc}"
    if not arrays or not all(isinstance(c, str) for c in captions):
        return None, "meta.json lists no tensors or captions"
    return Shard(captions, arrays, dtypes, path), ""


def _discard(shards: list[Shard], state: str, why: str) -> None:
    """Name each shard on stderr and remove it (a folder this cache wrote: its name matches SHARD_NAME)."""
    for shard in shards:
        say((f"The text-embedding cache {shard.path} is {state} ({why}); encoding its captions again.", "yellow"))
        shutil.rmtree(shard.path, ignore_errors=True)
