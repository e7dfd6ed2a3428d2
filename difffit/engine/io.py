"""File safety shared by every command: atomic writes, difffit's folder marker, output checks, the run lock.

The rules they keep: a crash never leaves a half-written file under its real name; a command never
replaces what it did not create (an existing output needs `--overwrite`, and a folder is replaced only
when difffit's own marker says difffit wrote it); an input is never an output.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from difffit.engine.errors import DiffFitError

MARKER = ".difffit"  # a small JSON file in every folder difffit creates as an output
LOCK = ".difffit.lock"
TMP_NAME_CHARS = 200  # of an output's name kept in its temporary name
# How torch.save ("unexpected pos"), safetensors (StorageFull) and the OS word a full disk.
DISK_FULL_WORDS = ("No space left", "StorageFull", "unexpected pos", "failed writing file")


def write_marker(folder: Path, kind: str) -> None:
    """Mark `folder` as written by difffit (`kind`: run, samples, merge, cache, checkpoint)."""
    (folder / MARKER).write_text(json.dumps({"tool": "difffit", "kind": kind}) + "\n")


def has_marker(folder: Path) -> bool:
    return (folder / MARKER).is_file()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, kind: str | None = "output", option: str = "--out") -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place only if the block succeeds.

    A crash (or SIGKILL) mid-write leaves at most a `.tmp-*` file, never a half-written `path`.
    Works for files and for folders; a folder gets difffit's marker (`kind` says what it holds; None:
    no marker). An existing folder is swapped out only when it is empty or carries that marker
    (commands check `--overwrite` before they get here; this is the last line of defence). A full disk
    is one sentence whose hint names `option`, the setting that puts the file elsewhere.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The name is cut so that any valid output name leaves a valid temporary one (".tmp-" + 8 random
        # characters would push a 250-character name past the file system's 255).
        fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name[:TMP_NAME_CHARS]}-", dir=path.parent)
    except OSError as exc:
        raise _friendly_os_error(exc, path, option) from None
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the caller creates it (as a file or a folder)
    try:
        yield tmp
        if tmp.is_dir() and kind is not None:
            write_marker(tmp, kind)
        # mkstemp's name, and some writers (safetensors), make private (0600) files: the result gets
        # the modes of the user's umask, as any file they create would.
        umask = _umask()
        for item in (tmp, *tmp.rglob("*")) if tmp.is_dir() else (tmp,):
            if item.is_symlink() or (item.is_file() and item.stat().st_nlink > 1):
                continue  # a link to another's file (a merged pipeline's unchanged parts): its modes are not ours
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)
        if tmp.is_dir() and path.is_dir():
            if any(path.iterdir()) and not has_marker(path):
                raise DiffFitError(f"{path} already exists and was not written by difffit; it is left as it is.",
                                   hint="Choose another output path.")
            old = path.with_name(f".old-{path.name}-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except OSError as exc:
        raise _friendly_os_error(exc, path, option) from None
    except Exception as exc:  # writers that wrap the OS error (torch.save, safetensors) in their own type
        if any(words in str(exc) for words in DISK_FULL_WORDS):
            raise _friendly_os_error(OSError(errno.ENOSPC, str(exc)), path, option) from None
        if tmp.name in str(exc):  # torch.save's "File .tmp-... cannot be opened", say: name the real output
            said = str(exc).replace(str(tmp), str(path)).replace(tmp.name, path.name)
            raise DiffFitError(f"Could not write {path} ({said.rstrip('.')}).") from None
        raise
    finally:
        if tmp.exists():
            _remove(tmp)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _friendly_os_error(exc: OSError, path: Path, option: str) -> Exception:
    """Disk full and permission problems as one sentence naming the path; anything else as the same error
    about `path` (never the temporary name, which the user never asked for)."""
    if exc.errno == errno.ENOSPC:
        return DiffFitError(f"The disk is full while writing {path}; nothing was written under that name.",
                            hint=f"Free some space, or write elsewhere with {option}.")
    if isinstance(exc, PermissionError):
        return DiffFitError(f"Permission denied writing {path}.", hint="Choose a folder you can write to.")
    return OSError(exc.errno, exc.strerror, str(path)) if exc.errno is not None else exc


def check_output(path: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = (),
                 folder: bool = False, option: str = "--out") -> Path:
    """Refuse an output that would destroy data, in one sentence naming it; returns the path.

    - an output equal to an input, containing one, or inside an input folder: always refused;
    - an existing output: refused unless `overwrite`; a file where a folder is wanted (or the
      reverse): refused; an existing folder is replaced only if difffit's marker is in it.
    """
    out = Path(path).expanduser()
    resolved = out.resolve()
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if resolved == source or resolved in source.parents or (source.is_dir() and source in resolved.parents):
            raise DiffFitError(f"{option} {out} would overwrite the input {given}; an input is never an output.",
                               hint="Choose another output path.")
    if not out.exists():
        return out
    if folder and not out.is_dir():
        raise DiffFitError(f"{option} {out} is an existing file, and this output is a folder.",
                           hint="Choose a new folder name.")
    if not folder and out.is_dir():
        raise DiffFitError(f"{option} {out} is a folder, and this output is a file.", hint="Give a file name.")
    if not overwrite:
        raise DiffFitError(f"{out} already exists.", hint="Add --overwrite to replace it, or choose another path.")
    if folder and not has_marker(out):
        raise DiffFitError(f"{out} exists and was not written by difffit, so --overwrite does not replace it.",
                           hint="Choose a new folder, or remove it yourself.")
    return out


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on an output folder for the whole run. The kernel drops it when the process
    ends however it ends, so a killed run never leaves a lock that blocks the next one."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    handle = open(path, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise DiffFitError(f"{folder} is in use by another difffit run ({holder}).",
                               hint="Wait for it to finish, or choose another --out.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def special_kind(path: str | os.PathLike) -> str | None:
    """What an existing path is when it is neither a regular file nor a folder ("a FIFO (named pipe)", "a
    character device", ...), following links; None for a file, a folder or nothing at all."""
    try:
        mode = os.stat(Path(path).expanduser()).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def check_readable(path: str | os.PathLike, what: str) -> None:
    """The one check of every input read from a path: something that is neither a regular file nor a folder
    (a FIFO would block the read forever, a device never end it) is refused in one sentence naming `what` it
    was given as. A missing path passes: the reader says what it expected there."""
    if kind := special_kind(path):
        raise DiffFitError(f"The {what} {path} is {kind}, not a regular file or folder; difffit reads only those.")


def check_folder_path(path: str | os.PathLike, option: str) -> None:
    """Refuse, in one sentence and before any work, a folder option (`option`, e.g. --cache-dir) naming an existing
    file or device, or a path under one, where a folder is to be used or made."""
    given = Path(path).expanduser()
    existing = next((p for p in (given, *given.parents) if os.path.lexists(p)), None)
    if existing is None or existing.is_dir():
        return
    what = special_kind(existing) or "a file"
    where = "" if existing == given else f": {existing} is {what}"
    raise DiffFitError(f"{option} {path} cannot be a folder{where or f', it is {what}'}.",
                       hint="Give a folder (it is created if missing).")


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
