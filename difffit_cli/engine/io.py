"""File helpers shared by everything that writes files a later run reads."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place only if the block succeeds.

    A crash (or SIGKILL) mid-write leaves at most a `.tmp-*` file, never a half-written `path`.
    Works for files and for folders (a folder is swapped in as a whole).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the caller creates it (as a file or a folder)
    try:
        yield tmp
        if tmp.is_file():  # mkstemp's name was private (0600); the result gets the usual umask mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        if tmp.is_dir() and path.is_dir():
            old = path.with_name(f".old-{path.name}-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def files_signature(files: Iterable[Path], root: Path) -> str:
    """What identifies a set of files without reading them: relative names, sizes and mtimes, a line each.

    Cache keys (latents, FID statistics, local VAEs) hash this, so an edited or replaced file misses.
    """
    lines = []
    for f in files:
        st = f.stat()
        lines.append(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n")
    return "".join(lines)


def user_cache_dir() -> Path:
    """Where difffit caches latents and statistics: $DIFFFIT_CACHE, else $XDG_CACHE_HOME/difffit."""
    if env := os.environ.get("DIFFFIT_CACHE"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "difffit"
