"""Adapters on the Hugging Face Hub: `hf://OWNER/NAME[/file]` or `OWNER/NAME` to a local file.

An adapter repo (what `difffit push` uploads) holds a difffit adapter .safetensors and none of a
base's files (model_index.json, config.json, transformer/). `OWNER/NAME` means an adapter repo when
it holds adapter.safetensors (push's name); `hf://OWNER/NAME` also takes a repo's only .safetensors,
and `hf://OWNER/NAME/FILE` any file. Everything else is left to `families.load_base`. Files land in
the standard Hub cache, so a later offline run (HF_HUB_OFFLINE or DIFFFIT_NO_DOWNLOAD) reads them there.
"""

from __future__ import annotations

from pathlib import Path

from difffit.engine.errors import DiffFitError
from difffit.engine.hub import (
    OFFLINE,
    downloads_disabled,
    error_summary,
    hub_cache_dir,
    hub_ref,
    network_errors,
)
from difffit.engine.methods.adapter import is_adapter_file
from difffit.engine.models.bases import ALIASES

ADAPTER_FILE = "adapter.safetensors"
BASE_FILES = ("model_index.json", "config.json", "transformer/config.json")


def resolve_adapter_source(spec: str) -> str | None:
    """The local path of the adapter that `spec` names on the Hub, or None when `spec` is no adapter
    repo (a local path, an alias, a base repo, a repo that cannot be listed), for the caller to
    read as a base. `hf://` says the user means an adapter, so failures there are DiffFitErrors."""
    ref = None if spec in ALIASES else hub_ref(spec)  # "DiT-XL/2-256" looks like OWNER/NAME
    if ref is None:
        return None
    if ref.filename:
        return _download(ref.repo_id, ref.filename, spec)
    files, why = _repo_files(ref.repo_id)
    if files is None or any(name in files for name in BASE_FILES):
        if not ref.explicit:
            return None
        if files is None:
            raise DiffFitError(
                f"{spec}: the hub repo {ref.repo_id} {why}.",
                hint=f"Check the name, or run `hf download {ref.repo_id}` where there is network "
                "(with the same HF_HOME).",
            )
        raise DiffFitError(
            f"{spec} is a base model repo, not a difffit adapter.",
            hint=f"To use it as a base, pass {ref.repo_id} without hf://.",
        )
    candidates = sorted(name for name in files if name.endswith(".safetensors") and "/" not in name)
    if ADAPTER_FILE in candidates:
        return _download(ref.repo_id, ADAPTER_FILE, spec)
    if not ref.explicit:
        return None  # a bare OWNER/NAME is an adapter repo only by push's file name (no guessing downloads)
    if len(candidates) != 1:
        found = ", ".join(candidates) or "no .safetensors file"
        raise DiffFitError(
            f"The hub repo {ref.repo_id} holds {found}, not one {ADAPTER_FILE}.",
            hint=f"Name the file: hf://{ref.repo_id}/FILE.safetensors.",
        )
    return _download(ref.repo_id, candidates[0], spec)


def _repo_files(repo_id: str) -> tuple[list[str] | None, str]:
    """(the repo's file names, "") from its cached snapshot when that tells what the repo is (so a cached
    base or adapter needs no network), else from the Hub when downloads are on; (None, why) when
    neither knows the repo."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cached = None
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=hub_cache_dir(), local_files_only=True))
        cached = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        pass
    if downloads_disabled() or any(name in BASE_FILES or name.endswith(".safetensors") for name in cached or []):
        return cached, f"is not in the Hugging Face cache {hub_cache_dir()} ({OFFLINE})"
    try:
        return HfApi().list_repo_files(repo_id), ""
    except (*network_errors(), HFValidationError, ValueError) as exc:  # not on the Hub, no access, or no network
        return cached, f"could not be listed on the Hub ({error_summary(exc)}) and is not cached"


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
