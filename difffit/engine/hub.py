"""The Hugging Face hub cache that bases and VAEs come from, and the one switch that turns downloads off."""

from __future__ import annotations

import importlib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from difffit.engine.errors import DiffFitError

# "owner/name" or "owner/name/subfolder" (e.g. "facebook/DiT-XL-2-256/vae").
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*$")
HUB_NAME = re.compile(r"^[\w.-]+$")  # one part of a hub address: owner, repo name, file or folder name
HF_PREFIX = "hf://"  # says "on the Hub" explicitly, as in hf://OWNER/NAME[/FILE]
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")  # checkpoint files: always local paths
OFFLINE = "downloads are off: HF_HUB_OFFLINE or DIFFFIT_NO_DOWNLOAD is set"


@dataclass(frozen=True)
class HubRef:
    """A place on the Hub that a spec names: a repo, and a file or folder in it ("" for the repo itself)."""

    repo_id: str
    filename: str = ""
    explicit: bool = False  # written as hf://, so the user certainly means the Hub


def hub_ref(spec: str, *, subfolders: bool = False) -> HubRef | None:
    """Where `spec` points on the Hub, or None when it is a local path (or no Hub name at all).

    `hf://OWNER/NAME[/FILE]` always means the Hub; a malformed one is a DiffFitError saying what is wrong.
    Without the prefix only a bare `OWNER/NAME` does (with `subfolders`, also `OWNER/NAME/SUB`: a VAE inside
    a pipeline repo). A path that exists, ends in a checkpoint suffix, starts with `.`, `/` or `~`, or holds
    more `/`s is local, so a mistyped path fails at once as missing instead of after a round of Hub retries.
    """
    if spec.startswith(HF_PREFIX):
        return _explicit_ref(spec)
    local = spec.startswith((".", "/", "~")) or spec.lower().endswith(WEIGHT_SUFFIXES) or Path(spec).exists()
    if local or not HUB_ID.match(spec) or (spec.count("/") > 1 and not subfolders):
        return None
    repo_id, rest = split_hub_id(spec)
    return HubRef(repo_id, rest)


def _explicit_ref(spec: str) -> HubRef:
    parts = spec[len(HF_PREFIX) :].rstrip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise DiffFitError(
            f"{spec} does not name a hub repo: it needs an owner and a name, one '/' apart.",
            hint="Write hf://OWNER/NAME, or hf://OWNER/NAME/FILE for one file of the repo.",
        )
    if bad := next((part for part in parts if not HUB_NAME.match(part)), None):
        raise DiffFitError(
            f"{spec} is not a hub address: {bad!r} holds characters other than letters, digits, '-', '_' and '.'."
        )
    return HubRef(f"{parts[0]}/{parts[1]}", "/".join(parts[2:]), explicit=True)


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment now (its constants freeze at import)."""
    if env := os.environ.get("HF_HUB_CACHE"):
        return Path(env).expanduser()
    default_home = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(os.environ.get("HF_HOME", default_home)).expanduser() / "hub"


def downloads_disabled() -> bool:
    """True when downloads are off: HF_HUB_OFFLINE (huggingface_hub's switch) or DIFFFIT_NO_DOWNLOAD."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("DIFFFIT_NO_DOWNLOAD", ""))
    return any(flag.strip().lower() in {"1", "true", "yes", "on"} for flag in flags)


def network_reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether `host` answers on port 443: a quick look before waiting on a download or a service."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def network_errors() -> tuple[type[Exception], ...]:
    """What huggingface_hub raises when the Hub cannot be reached: its own HfHubHTTPError, OSError
    (requests, before 1.0), httpx.HTTPError (1.x) or httpx2.HTTPError (2.x)."""
    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[Exception]] = [HfHubHTTPError, OSError]
    for name in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except ImportError:
            continue
    return tuple(errors)


def hub_snapshot(repo_id: str, allow_patterns: list[str], what: str, instead: str) -> Path:
    """The local snapshot folder of `repo_id` holding `allow_patterns`, downloading them if allowed.

    Files land in the standard Hugging Face cache (`hub_cache_dir()`), shared with diffusers.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, LocalEntryNotFoundError

    cache, offline = hub_cache_dir(), downloads_disabled()
    try:
        folder = snapshot_download(repo_id, allow_patterns=allow_patterns, cache_dir=cache, local_files_only=offline)
    except GatedRepoError:  # before the network errors: it is one (an HTTP 401/403)
        raise DiffFitError(
            f"{what[0].upper()}{what[1:]} is in {repo_id}, a gated Hub repo whose licence this account has not "
            f"accepted: accept it on its licence page, https://huggingface.co/{repo_id}, then log in with "
            "`hf auth login` (or set HF_TOKEN)."
        ) from None
    except (LocalEntryNotFoundError, HFValidationError, *network_errors()) as e:
        why = OFFLINE if offline else error_summary(e)
        raise DiffFitError(
            f"{what[0].upper()}{what[1:]} is not in the Hugging Face cache {cache} and could not be "
            f"downloaded ({why}); run `hf download {repo_id}` with network access and the same HF_HOME, "
            f"or {instead}."
        ) from None
    return Path(folder)


def split_hub_id(spec: str) -> tuple[str, str]:
    """A Hub path split into repo and folder: "owner/name/sub/folder" -> ("owner/name", "sub/folder")."""
    owner, name, *rest = spec.split("/")
    return f"{owner}/{name}", "/".join(rest)


def error_summary(error: Exception) -> str:
    """The first line of an exception's message, for one-sentence errors."""
    text = str(error).strip().splitlines()
    return text[0].rstrip(".") if text else type(error).__name__
