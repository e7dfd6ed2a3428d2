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
HEAD_BYTES = 4096  # of a file read to tell whether difffit wrote it
SAFETENSORS_HEADER_MAX = 100_000_000  # safetensors' own limit on its JSON header
REPORT_TITLE = b"<title>difffit report"  # how `difffit report` pages begin


def write_marker(folder: Path, kind: str, files: Iterable[str] | None = None) -> None:
    """Mark `folder` as written by difffit (`kind`: run, samples, merge, cache, checkpoint). `files`: the
    paths (relative, `/`-separated) difffit wrote there; a later `--overwrite` replaces only those."""
    record = {"tool": "difffit", "kind": kind, **({"files": sorted(files)} if files is not None else {})}
    (folder / MARKER).write_text(json.dumps(record) + "\n")


def has_marker(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def written_files(folder: Path) -> set[str] | None:
    """The files difffit's marker in `folder` says it wrote; None when the marker lists none."""
    try:
        files = json.loads((folder / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return set(map(str, files)) if isinstance(files, list) else None


def _entries(folder: Path) -> list[str]:
    """Every file, link and empty folder under `folder` (links not followed), relative and `/`-separated."""
    found = []
    for here, dirs, files in os.walk(folder):
        rel = Path(here).relative_to(folder)
        names = files + [d for d in dirs if (Path(here) / d).is_symlink() or not any((Path(here) / d).iterdir())]
        found += [(rel / name).as_posix() for name in names]
    return found


def _kept_entries(old: Path, new: Path) -> list[str]:
    """What `old` (an output folder difffit wrote) holds that difffit did not write: kept when `new` replaces
    it. Refused in one sentence, before anything changes, when one of them has a name `new` takes, or when
    `old`'s marker does not list what difffit wrote (an older version's folder) and it holds anything `new`
    does not replace: no one's file is ever replaced, or mixed into a new output, unasked."""
    written = written_files(old)
    others = sorted(e for e in _entries(old) if e not in {MARKER, LOCK} and e not in (written or ()))
    if written is None:
        unknown = [e for e in others if not (new / e).exists() or (new / e).is_dir() != (old / e).is_dir()]
        if unknown:
            raise DiffFitError(
                f"{old / unknown[0]} may not be difffit's (the folder's marker does not list what "
                "difffit wrote), and the new output does not replace it; nothing was changed.",
                hint="Move your files out of it, or choose another output.",
            )
        return []
    # a user's empty folder where the new output has one: nothing to keep
    others = [e for e in others if not ((old / e).is_dir() and not (old / e).is_symlink() and (new / e).is_dir())]
    taken = [
        e
        for e in others
        if (new / e).exists()
        or (new / e).is_symlink()
        or any((new / part).is_file() or (new / part).is_symlink() for part in map(str, Path(e).parents[:-1]))
    ]
    if taken:
        raise DiffFitError(
            f"{old / taken[0]} was not written by difffit, and the new output writes one of that "
            "name; nothing was changed.",
            hint="Move it elsewhere, or choose another output.",
        )
    return others


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
            write_marker(tmp, kind, files=_entries(tmp))
        # mkstemp's name, and some writers (safetensors), make private (0600) files: the result gets
        # the modes of the user's umask, as any file they create would.
        umask = _umask()
        for item in (tmp, *tmp.rglob("*")) if tmp.is_dir() else (tmp,):
            if item.is_symlink() or (item.is_file() and item.stat().st_nlink > 1):
                continue  # a link to another's file (a merged pipeline's unchanged parts): its modes are not ours
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)
        if tmp.is_dir() and path.is_dir():
            if any(path.iterdir()) and not has_marker(path):
                raise DiffFitError(
                    f"{path} already exists and was not written by difffit; it is left as it is.",
                    hint="Choose another output path.",
                )
            _replace_folder(path, tmp, kept=_kept_entries(path, tmp))
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


def _replace_folder(path: Path, new: Path, kept: list[str]) -> None:
    """Swap `new` in for the folder `path`, then move `kept` (a user's files in it) from the old folder into
    the new one. The old folder is removed only once they all moved: an error leaves them there, named."""
    old = path.with_name(f".old-{path.name}-{os.getpid()}")
    os.replace(path, old)
    os.replace(new, path)
    try:
        for entry in kept:
            (path / entry).parent.mkdir(parents=True, exist_ok=True)
            os.rename(old / entry, path / entry)
    except OSError as exc:
        raise DiffFitError(
            f"Could not keep your files of {path} in the new output ({exc.strerror}); they are in {old}.",
            hint="Move them back yourself.",
        ) from None
    _remove(old)


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
        return DiffFitError(
            f"The disk is full while writing {path}; nothing was written under that name.",
            hint=f"Free some space, or write elsewhere with {option}.",
        )
    if isinstance(exc, PermissionError):
        return DiffFitError(f"Permission denied writing {path}.", hint="Choose a folder you can write to.")
    return OSError(exc.errno, exc.strerror, str(path)) if exc.errno is not None else exc


def check_output(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike] = (),
    folder: bool = False,
    option: str = "--out",
) -> Path:
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
            raise DiffFitError(
                f"{option} {out} would overwrite the input {given}; an input is never an output.",
                hint="Choose another output path.",
            )
    if not out.exists():
        return out
    if folder and not out.is_dir():
        raise DiffFitError(
            f"{option} {out} is an existing file, and this output is a folder.", hint="Choose a new folder name."
        )
    if not folder and out.is_dir():
        raise DiffFitError(f"{option} {out} is a folder, and this output is a file.", hint="Give a file name.")
    if not overwrite:
        raise DiffFitError(f"{out} already exists.", hint="Add --overwrite to replace it, or choose another path.")
    if not (has_marker(out) if folder else written_by_difffit(out)):
        raise DiffFitError(
            f"{out} exists and was not written by difffit, so --overwrite does not replace it.",
            hint=f"Choose a new {'folder' if folder else 'file'}, or remove it yourself.",
        )
    return out


def written_by_difffit(path: Path) -> bool:
    """Whether the file `path` is one difffit writes: a .safetensors carrying difffit's metadata (adapters,
    merged models), a statistics .npz (its `difffit_stats` entry) or an HTML report (its title)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
            if head.startswith(b"PK"):  # an .npz is a zip: its member names are in the central directory
                return _zip_names_include(path, "difffit_stats.npy")
            size = int.from_bytes(head[:8], "little")
            if 2 <= size <= SAFETENSORS_HEADER_MAX and head[8:9] == b"{":
                header = json.loads((head[8:] + f.read(max(0, size - len(head) + 8)))[:size])
                metadata = header.get("__metadata__") or {}
                return any(key == "difffit" or key.startswith("difffit.") for key in metadata)
    except (OSError, ValueError, AttributeError):
        return False
    return REPORT_TITLE in head


def _zip_names_include(path: Path, name: str) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return name in z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


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
            raise DiffFitError(
                f"{folder} is in use by another difffit run ({holder}).",
                hint="Wait for it to finish, or choose another --out.",
            ) from None
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
    kinds = (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
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
    raise DiffFitError(
        f"{option} {path} cannot be a folder{where or f', it is {what}'}.",
        hint="Give a folder (it is created if missing).",
    )


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
