"""Adapters on the Hugging Face Hub: `hf://OWNER/NAME[/file]` or `OWNER/NAME` to a local file.

An adapter repo (what `difffit push` uploads) holds a difffit adapter .safetensors and none of a
base's files (model_index.json, config.json, transformer/). `OWNER/NAME` means an adapter repo when
it holds adapter.safetensors (push's name); `hf://OWNER/NAME` also takes a repo's only .safetensors,
and `hf://OWNER/NAME/FILE` any file. Everything else is left to `bases.load_base`. Files land in
the standard Hub cache, so a later offline run (HF_HUB_OFFLINE or DIFFFIT_NO_DOWNLOAD) reads them there.
"""

from __future__ import annotations

from pathlib import Path

from difffit_cli.engine.errors import DiffFitError
from difffit_cli.engine.hub import (
    HUB_ID,
    OFFLINE,
    downloads_disabled,
    error_summary,
    hub_cache_dir,
    network_errors,
    split_hub_id,
)
from difffit_cli.engine.methods.adapter import is_adapter_file
from difffit_cli.engine.models.bases import ALIASES

PREFIX = "hf://"
ADAPTER_FILE = "adapter.safetensors"
BASE_FILES = ("model_index.json", "config.json", "transformer/config.json")


def resolve_adapter_source(spec: str) -> str | None:
    """The local path of the adapter that `spec` names on the Hub, or None when `spec` is no adapter
    repo (a local path, an alias, a base repo, a repo that cannot be listed), for the caller to
    read as a base. `hf://` says the user means an adapter, so failures there are DiffFitErrors."""
    explicit = spec.startswith(PREFIX)
    body = spec[len(PREFIX):] if explicit else spec
    if not explicit and (spec in ALIASES or Path(spec).expanduser().exists()):
        return None
    if not HUB_ID.match(body):
        if explicit:
            raise DiffFitError(f"{spec} is not a hub adapter address; write hf://OWNER/NAME or hf://OWNER/NAME/FILE.")
        return None
    repo_id, filename = split_hub_id(body)
    if filename:
        if not explicit and not filename.endswith(".safetensors"):
            return None  # "owner/name/vae" and the like are base or VAE subfolders
        return _download(repo_id, filename, spec)
    files = _repo_files(repo_id)
    if files is None or any(name in files for name in BASE_FILES):
        if explicit:
            why = "is a base model repo, not a difffit adapter" if files else _unavailable(repo_id)
            raise DiffFitError(f"{spec} {why}.", hint=f"Pass a base as {repo_id}, an adapter repo as hf://OWNER/NAME.")
        return None
    candidates = sorted(name for name in files if name.endswith(".safetensors") and "/" not in name)
    if ADAPTER_FILE in candidates:
        return _download(repo_id, ADAPTER_FILE, spec)
    if not explicit:
        return None  # a bare OWNER/NAME is an adapter repo only by push's file name (no guessing downloads)
    if len(candidates) != 1:
        found = ", ".join(candidates) or "no .safetensors file"
        raise DiffFitError(f"The hub repo {repo_id} holds {found}, not one {ADAPTER_FILE}.",
                           hint=f"Name the file: hf://{repo_id}/FILE.safetensors.")
    return _download(repo_id, candidates[0], spec)


def _repo_files(repo_id: str) -> list[str] | None:
    """The repo's file names: from its cached snapshot when that tells what the repo is (so a cached
    base or adapter needs no network), else from the Hub when downloads are on; None when neither
    knows the repo."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cached = None
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=hub_cache_dir(), local_files_only=True))
        cached = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        pass
    if downloads_disabled() or any(name in BASE_FILES or name.endswith(".safetensors") for name in cached or []):
        return cached
    try:
        return HfApi().list_repo_files(repo_id)
    except (*network_errors(), HFValidationError, ValueError):
        return cached  # not on the Hub, or no network


def _download(repo_id: str, filename: str, spec: str) -> str:
    """`filename` of `repo_id` through the Hub cache; one sentence when it is neither cached nor reachable."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    offline = downloads_disabled()
    try:
        path = hf_hub_download(repo_id, filename, cache_dir=hub_cache_dir(), local_files_only=offline)
    except (LocalEntryNotFoundError, HFValidationError, *network_errors()) as exc:
        why = OFFLINE if offline else error_summary(exc)
        raise DiffFitError(
            f"The adapter {filename} of the hub repo {repo_id} is not in the Hugging Face cache "
            f"{hub_cache_dir()} and could not be downloaded ({why}).",
            hint=f"Run `hf download {repo_id} {filename}` with network access and the same HF_HOME.",
        ) from None
    if not is_adapter_file(path):
        raise DiffFitError(f"{spec} ({filename} of {repo_id}) is not a difffit adapter (no difffit metadata).")
    return path


def _unavailable(repo_id: str) -> str:
    if downloads_disabled():
        return f"is not in the Hugging Face cache {hub_cache_dir()} ({OFFLINE})"
    return "could not be listed on the Hub (no such repo, no access, or no network) and is not cached"
