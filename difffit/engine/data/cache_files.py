"""What every on-disk cache shares (latents, text embeddings): checksums, atomic builds, stale-build cleanup.

A cache folder is built under a temporary name (`engine.io.atomic_path`) with an owner record
(host and pid) inside, and renamed into place when complete; a later run that finds a build whose
owner is gone (or a very old one from another machine) removes it. Files are checked against a
CRC-32 recorded at build time when a cache is opened.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

from difffit.engine.errors import DiffFitError
from difffit.engine.io import atomic_path

CHECKSUM_CHUNK = 1 << 24
STALE_TMP_SECONDS = 7 * 24 * 3600  # a half-built cache this old has no live owner left
# atomic_path's temporary name for a cache folder named by a 32-hex key: only these are ever removed.
BUILD_NAME = re.compile(r"\.tmp-[0-9a-f]{32}-\w+")
OWNER = "owner.json"


def file_checksum(path: Path) -> str:
    """CRC-32 of a file, read in 16 MB chunks. It catches accidental damage (a stray write, a bad disk,
    a truncated copy), which is all a cache needs; at about 2 GB/s it costs a small fraction of encoding."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHECKSUM_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"crc32:{crc:08x}"


@contextlib.contextmanager
def cache_build(path: Path, option: str = "--cache-dir") -> Iterator[Path]:
    """A new, empty folder to build the cache `path` in (its name: a 32-hex key); renamed into place on
    success. The owner record inside lets `remove_stale_builds` tell a live build from an abandoned one.
    A full disk is one sentence whose hint names `option`, the setting that puts the cache elsewhere."""
    with atomic_path(path, option=option) as tmp:
        tmp.mkdir()
        (tmp / OWNER).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
        yield tmp
        (tmp / OWNER).unlink()


def require_free_space(build: Path, needed: int, what: str, hint: str) -> None:
    """Refuse, before anything is written, a cache of `needed` bytes that the disk of its `build` folder
    cannot hold: a full disk then fails before any work, and a write to a memory map (the text cache's) on a
    full disk would be a Bus error that kills the process with nothing said."""
    free = shutil.disk_usage(build).free
    if needed > free:
        raise DiffFitError(
            f"The {what} needs {needed / 1e9:.2f} GB and the disk of {build.parent} has {free / 1e9:.2f} GB free.",
            hint=hint,
        )


def remove_stale_builds(root: Path) -> None:
    """Remove cache builds left by killed runs: those whose owner process is gone, or very old. Only names
    that a build of this cache takes (`.tmp-<cache key>-*`) are touched: --cache-dir may be any folder."""
    if not root.is_dir():
        return
    for tmp in root.glob(".tmp-*"):
        if BUILD_NAME.fullmatch(tmp.name) and tmp.is_dir() and not _build_owner_alive(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _build_owner_alive(tmp: Path) -> bool:
    try:
        owner = json.loads((tmp / OWNER).read_text())
    except (OSError, ValueError):
        owner = None
    if not isinstance(owner, dict) or owner.get("host") != os.uname().nodename:
        # Another machine's build, or no owner record: only age tells it is abandoned.
        return time.time() - tmp.stat().st_mtime < STALE_TMP_SECONDS
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError):
        return True
    return True
