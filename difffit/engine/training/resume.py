"""What defines a run, recorded in each checkpoint, so that `fit --resume` continues the same run or says what
changed: its data (the image list and each caption), the base, the resolution and buckets, the batch, the
method and its settings, every other option that changes what is trained. A larger `--steps` is the change
resume exists for; options that only say where and how often things are written (or on which device) may
change too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from difffit.engine.data.images import ImageFolder
from difffit.engine.errors import DiffFitError

# Options a resumed run may change: where and how often it writes, logs and evaluates, how fast it runs, its
# length (--steps, refused below the checkpoint's step elsewhere), and the data's path (its content is checked).
RESUMABLE = frozenset(
    {
        "steps",
        "out",
        "resume",
        "data",
        "base",
        "vae",
        "save_every",
        "sample_every",
        "keep",
        "log_every",
        "log_with",
        "num_workers",
        "cache_dir",
        "cache_latents",
        "compile",
        "device",
        "grad_checkpointing",
        "adapter_dtype",
        "validation_prompts",
        "val_every",
        "eval_every",
        "eval_n",
        "eval_reference",
        "inception_weights",
        "keep_best",
        "val_data",
    }
)
RUN_KEY = "run"  # the checkpoint's state.json entry that holds the identity


def _digest(lines) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:32]


def data_identity(folder: ImageFolder) -> dict:
    """The trained items as a count and a digest of their names and sizes (a dataset: its rows and
    fingerprint), and a digest of their captions in the same order (text-to-image runs)."""
    if folder.rows is not None:
        images = _digest([folder.signature()])
    else:
        images = _digest(f"{folder.key(f)}:{f.stat().st_size}" for f in folder.files)
    captions = None if folder.captions is None else _digest(folder.captions)
    return {"images": len(folder), "image_list": images, "captions": captions}


def run_identity(
    resolved: dict, folder: ImageFolder, base_fingerprint: str | None, vae: str | None, buckets: list[dict] | None
) -> dict:
    """What defines the run: `resolved` (its resolved options) less RESUMABLE, the data, the base's weights, its
    VAE (one inside the base's folder by its place there: the folder may move), and the buckets; plain JSON,
    as state.json holds it."""
    settings = {k: v for k, v in resolved.items() if k not in RESUMABLE}
    base = Path(str(resolved.get("base")))
    if vae is not None and base.is_dir() and Path(vae).is_relative_to(base):
        vae = f"<base>/{Path(vae).relative_to(base).as_posix()}"
    identity = {
        "settings": settings,
        "data": data_identity(folder),
        "base_fingerprint": base_fingerprint,
        "vae": vae,
        "buckets": buckets,
    }
    return json.loads(json.dumps(identity, default=str))


def check_same_run(saved: dict | None, now: dict, checkpoint: str) -> None:
    """Refuse, in one sentence naming what changed, to resume a checkpoint of another run (`saved`: its
    identity; None for a checkpoint of a version that did not record one)."""
    if not isinstance(saved, dict):
        return
    changes = _changes(saved, now)
    if changes:
        raise DiffFitError(
            f"This run is not the one checkpointed in {checkpoint}: {'; '.join(changes)}.",
            hint="Resume with the same data and options (a larger --steps is fine), or start a new "
            "run with another --out.",
        )


def _changes(saved: dict, now: dict) -> list[str]:
    changes = []
    old_data, new_data = saved.get("data") or {}, now["data"]
    if old_data.get("image_list") != new_data["image_list"]:
        was, count = old_data.get("images"), new_data["images"]
        changes.append(
            f"the training images changed ({was} then, {count} now)"
            if was != count
            else f"the training images changed (as many, {count}, but other files or sizes)"
        )
    elif old_data.get("captions") != new_data["captions"]:
        changes.append("the captions changed")
    old_settings, new_settings = saved.get("settings") or {}, now["settings"]
    for key in sorted(set(old_settings) | set(new_settings)):
        if old_settings.get(key) != new_settings.get(key):
            changes.append(
                f"--{key.replace('_', '-')} was {_shown(old_settings.get(key))}, now {_shown(new_settings.get(key))}"
            )
    if saved.get("base_fingerprint") != now["base_fingerprint"]:
        changes.append("the base model's weights changed")
    if saved.get("vae") != now["vae"]:
        changes.append(f"the VAE was {_shown(saved.get('vae'))}, now {_shown(now['vae'])}")
    if not changes and saved.get("buckets") != now["buckets"]:
        changes.append("the aspect-ratio buckets changed")
    return changes


def _shown(value) -> str:
    return "unset" if value is None else json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
