"""`difffit push`: an adapter (or the model merged from it), a sample grid and a model card to the Hub.

Beside a text-to-image adapter that folds exactly into ComfyUI's layout (`merge --format comfyui`), the
repo also gets that ComfyUI file, `<repo name>-comfyui.safetensors`, and the card says how to use it.

The upload folder is built first, in full; `--dry-run --out DIR` stops there, so DIR holds exactly
what would be uploaded. The upload itself is huggingface_hub's `create_repo` + `upload_folder`.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from difffit.engine.devices import resolve_device
from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation.sample import SamplingOptions, generate, parse_classes
from difffit.engine.evaluation.sample_folder import save_grid
from difffit.engine.hub import downloads_disabled, error_summary, network_errors
from difffit.engine.io import MARKER, atomic_path
from difffit.engine.methods.adapter import read_adapter
from difffit.engine.methods.merge import merge_adapter
from difffit.engine.methods.sources import load_source
from difffit.engine.progress import say
from difffit.engine.sharing.card import MAX_CLASSES_LISTED, model_card
from difffit.engine.training.runs import previews, read_eval_json, training_summary

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ADAPTER_FILE = "adapter.safetensors"
GRID_FILE = "grid.png"
CARD_FILE = "README.md"
GRID_PER_CLASS = 4
GRID_SAMPLING = {"scheduler": "ddim", "steps": 50, "cfg_scale": 4.0, "seed": 0}


def push_adapter(
    adapter: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    eval_json: str | Path | None = None,
    grid_classes: list[str] | None = None,
    merged: bool = False,
    license: str | None = None,
    dry_run_out: str | Path | None = None,
) -> dict:
    """Build the upload folder of `adapter` for `repo_id` and upload it (or, with `dry_run_out`, write
    it there and upload nothing). Returns what was done: repo, url, revision, files."""
    if not REPO_ID.match(repo_id):
        raise DiffFitError(f"{repo_id!r} is not a hub repo id; write OWNER/NAME, e.g. my-name/food101-difffit.")
    adapter = Path(adapter)
    read_adapter(adapter)  # refused exactly as sample refuses it (damaged, corrupt, NaN), before anything is built
    summary = training_summary(adapter)
    announce_quoted_prompts(summary["training"])
    eval_result = read_eval_json(eval_json) if eval_json is not None else None
    build = {
        "summary": summary,
        "repo_id": repo_id,
        "eval_result": eval_result,
        "grid_classes": grid_classes,
        "merged": merged,
        "license": license,
    }
    if dry_run_out is not None:
        out = Path(dry_run_out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise DiffFitError(
                f"{out} already exists and is not an empty folder; --dry-run writes a new one.",
                hint="Choose another --out.",
            )
        with atomic_path(out, kind=None) as tmp:  # no marker: exactly the files that would be uploaded
            tmp.mkdir()
            files = build_upload_folder(adapter, tmp, **build)
        return {
            "repo_id": repo_id,
            "dry_run": True,
            "out": str(out),
            "files": files,
            "url": None,
            "revision": revision,
            "private": private,
        }
    if downloads_disabled():
        raise DiffFitError(
            "push needs the network, but HF_HUB_OFFLINE or DIFFFIT_NO_DOWNLOAD is set.",
            hint="Unset them, or use --dry-run --out DIR to see what would be uploaded.",
        )
    message = message or f"Upload {'merged ' if merged else ''}{summary['method']} adapter with difffit"
    with tempfile.TemporaryDirectory(prefix="difffit-push-") as tmp:
        files = build_upload_folder(adapter, Path(tmp), **build)
        url = _upload(Path(tmp), repo_id, private=private, revision=revision, message=message)
    return {
        "repo_id": repo_id,
        "dry_run": False,
        "out": None,
        "files": files,
        "url": url,
        "revision": revision,
        "private": private,
    }


def announce_quoted_prompts(training: dict) -> None:
    """Say, before anything is built or uploaded, which prompts the model card quotes (a text-to-image run's
    preview prompts, by default its first captions), and which of them were read from a file outside the data
    folder (a caption file linked from elsewhere), which the user may not mean to publish."""
    quoted = (training.get("validation_prompts") or [])[:MAX_CLASSES_LISTED]
    if not quoted:
        return
    say(f"The model card quotes {len(quoted)} preview prompt(s): {'; '.join(map(repr, quoted))}.")
    outside = training.get("outside_prompts") or {}
    for prompt in (p for p in quoted if p in outside):
        say(
            (
                f"Warning: the preview prompt {prompt!r} is the caption file {outside[prompt]}, outside the data "
                "folder; it is published in the card.",
                "yellow",
            )
        )


def build_upload_folder(
    adapter: Path,
    folder: Path,
    *,
    summary: dict,
    repo_id: str,
    eval_result: dict | None,
    grid_classes: list[str] | None,
    merged: bool,
    license: str | None,
) -> list[str]:
    """Write the repo's files into the empty `folder`; returns their names, sorted."""
    if merged:
        merge_adapter(str(adapter), folder / "pipeline", fmt="diffusers")
        (folder / "pipeline" / MARKER).unlink()  # difffit's local folder marker has no place on the Hub
        for item in (folder / "pipeline").iterdir():  # a DiTPipeline loads from the repo's root
            item.rename(folder / item.name)
        (folder / "pipeline").rmdir()
    else:
        shutil.copyfile(adapter, folder / ADAPTER_FILE)
    comfyui = None
    if not merged and "comfyui" in summary.get("merge_formats", []):
        comfyui = comfyui_file_name(repo_id)
        merge_adapter(str(adapter), folder / comfyui, fmt="comfyui")
    caption = _write_grid(adapter, folder / GRID_FILE, grid_classes)
    card = model_card(
        summary,
        repo_id,
        eval_result=eval_result,
        grid=GRID_FILE if caption else None,
        grid_caption=caption or "",
        merged=merged,
        license=license,
        comfyui_file=comfyui,
    )
    card.save(folder / CARD_FILE)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def comfyui_file_name(repo_id: str) -> str:
    """The ComfyUI file's name in the repo: ComfyUI's LoRA list shows file names, so it says what it is."""
    return f"{repo_id.split('/')[-1]}-comfyui.safetensors"


def _write_grid(adapter: Path, path: Path, grid_classes: list[str] | None) -> str | None:
    """The sample grid: sampled now for `grid_classes`, else the run's last preview; its caption
    (None: no grid, as for an adapter that travelled without its run folder)."""
    if grid_classes:
        base, meta = load_source(str(adapter))
        if not meta.model_family.class_table:
            raise DiffFitError(
                f"--grid-classes applies to class-conditional adapters, and {adapter} is a "
                f"{meta.model_family.title} adapter.",
                hint="Leave it out: the card shows the run's last preview grid, of its validation prompts.",
            )
        classes = parse_classes(grid_classes, meta.class_names, meta.num_classes)
        images = generate(
            base,
            GRID_PER_CLASS * len(classes),
            SamplingOptions(**GRID_SAMPLING),
            classes=classes,
            device=resolve_device("auto"),
            progress=False,
        )
        save_grid(images, path)
        names = [meta.class_names[c] if meta.class_names else str(c) for c in classes]
        settings = GRID_SAMPLING
        return (
            f"{GRID_PER_CLASS} samples each of {', '.join(names)} (difffit sample, {settings['scheduler']} "
            f"{settings['steps']} steps, cfg {settings['cfg_scale']}, seed {settings['seed']})."
        )
    found = previews(adapter.parent)
    if not found:
        return None
    step, preview = found[-1]
    shutil.copyfile(preview, path)
    return f"Preview samples of the training run at step {step:,}."


def _upload(folder: Path, repo_id: str, *, private: bool, revision: str | None, message: str) -> str:
    """create_repo (kept if it exists), the branch `revision` if given, then one commit of `folder`."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message)
    except network_errors() as exc:
        refused = isinstance(exc, HfHubHTTPError)  # the Hub answered: no token, no write access, bad name
        hint = (
            "Log in with `hf auth login` (a token with write access to the repo), then push again."
            if refused
            else "Check the network connection, then push again."
        )
        raise DiffFitError(f"Uploading to {repo_id} failed ({error_summary(exc)}).", hint=hint) from None
    return str(getattr(commit, "commit_url", None) or repo_url)
