"""The model card (README.md) of a pushed adapter, through huggingface_hub's ModelCard.

The YAML front matter is `ModelCardData`'s; the body is the Jinja template
`difffit/assets/model_card.md`, rendered by `ModelCard.from_template`.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from difffit.engine.errors import DiffFitError
from difffit.engine.hub import hub_ref
from difffit.engine.models.bases import ALIASES, RANDOM_PREFIX, TINY
from difffit.engine.models.families import PIPELINE_KINDS, family_named
from difffit.engine.models.families.pipeline_bases import TINY_T2I
from difffit.engine.models.family import TextConditioning
from difffit.engine.models.vae import IDENTITY_VAE
from difffit.engine.training.runs import format_duration, split_eval

if TYPE_CHECKING:
    from huggingface_hub import ModelCard, ModelCardData

    from difffit.engine.models.family import Family

TEMPLATE = Path(__file__).resolve().parents[2] / "assets" / "model_card.md"
# Hub repos of the aliases of every family (a pipeline alias names the repo holding its transformer).
PIPELINE_ALIASES = {name: alias for kind in PIPELINE_KINDS for name, alias in kind.aliases.items()}
ALIAS_REPOS = {**ALIASES, **{name: alias.transformer for name, alias in PIPELINE_ALIASES.items()}}
# Licenses of the bases difffit knows by name: Meta released DiT's weights under CC-BY-NC 4.0; each pipeline
# alias names its repo's (PixArt: CreativeML Open RAIL++-M; FLUX.1-schnell: Apache 2.0; SD3 and FLUX.1-dev:
# licenses of their own, "other").
BASE_LICENSES = {
    **{hub_id: "cc-by-nc-4.0" for hub_id in ALIASES.values()},
    **{alias.transformer: alias.license for alias in PIPELINE_ALIASES.values()},
}
# A license of the base's own ("other") is named as its repo names it, and linked to the repo, which shows it.
BASE_LICENSE_NAMES = {
    alias.transformer: alias.license_name for alias in PIPELINE_ALIASES.values() if alias.license_name
}
DEFAULT_LICENSE = "other"
MAX_CLASSES_LISTED = 100
METRIC_NAMES = {
    "fid": "FID",
    "kid_mean": "KID",
    "kid_std": "KID std",
    "isc_mean": "Inception Score",
    "isc_std": "IS std",
    "precision": "Precision",
    "recall": "Recall",
}


def hub_base_id(base_spec: str) -> str | None:
    """The hub repo a base spec names (an alias's repo, or a hub id), None for local or random bases."""
    if base_spec in ALIAS_REPOS:
        return ALIAS_REPOS[base_spec]
    return _hub_repo(base_spec)


def public_name(spec: str, *, subfolders: bool = False) -> str:
    """How a public card names a base or VAE spec: as given when anyone can resolve it, else by its file or
    folder name only, because a local path would show the author's file system."""
    return spec if resolvable(spec, subfolders=subfolders) else Path(spec).name


def resolvable(spec: str, *, subfolders: bool = False) -> bool:
    """Whether anyone can load `spec`: a hub id, an alias, random:..., a bundled tiny base, identity.
    `subfolders`: a VAE may live in a repo's vae/ folder."""
    anyones = spec in ALIAS_REPOS or spec in (TINY, TINY_T2I, IDENTITY_VAE) or spec.startswith(RANDOM_PREFIX)
    return anyones or _hub_repo(spec, subfolders=subfolders) is not None


def _hub_repo(spec: str, subfolders: bool = False) -> str | None:
    try:
        ref = hub_ref(spec, subfolders=subfolders)
    except DiffFitError:  # a malformed hf:// address names no repo
        return None
    return ref.repo_id if ref else None


def model_card(
    summary: dict,
    repo_id: str,
    *,
    eval_result: dict | None = None,
    grid: str | None = None,
    grid_caption: str = "",
    merged: bool = False,
    license: str | None = None,
    comfyui_file: str | None = None,
) -> ModelCard:
    """The card of the adapter described by `summary` (`runs.training_summary`), pushed to `repo_id`.

    `grid`: the sample image's name in the repo; `merged`: the repo holds a merged DiTPipeline
    instead of the adapter; `license`: default, the base's license when difffit knows it, else "other";
    `comfyui_file`: the name of the ComfyUI file beside the adapter, if the repo holds one.
    """
    from huggingface_hub import ModelCard

    base_id = hub_base_id(summary["base"])
    family = family_named(summary.get("family"))
    card_data = _card_data(base_id, family, summary["method"], merged=merged, license=license)
    metrics, settings = split_eval(eval_result) if eval_result else ({}, {})
    names = summary.get("class_names") or [str(i) for i in range(summary.get("num_classes") or 0)]
    prompts = summary["training"].get("validation_prompts") or []
    example_prompt = prompts[0] if prompts else "a photo"
    base_name = public_name(summary["base"])
    local_base = None if resolvable(summary["base"]) else base_name
    base_text = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{base_name}`"
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        repo_id=repo_id,
        merged=merged,
        method_name="DiffFit" if summary["method"] == "difffit" else summary["method"],
        base_text=base_text + (" (a local base)" if local_base else ""),
        local_base=local_base,
        base_option=f" --base {local_base}" if local_base else "",
        base_pipeline=base_id or f"path/to/{local_base or base_name}",
        comfyui_file=comfyui_file,
        merge_formats=summary.get("merge_formats", []),
        adapter_size=format_bytes(summary["file_bytes"]),
        class_rows=names[:MAX_CLASSES_LISTED],
        more_classes=max(0, len(names) - MAX_CLASSES_LISTED),
        text=family.conditioning == "text",
        prompt_rows=prompts[:MAX_CLASSES_LISTED],
        example_prompt=example_prompt,
        sample_condition=f"--prompt {shlex.quote(example_prompt)}"
        if family.conditioning == "text"
        else f"--class {names[0] if ' ' not in names[0] else '0'}",
        pipeline_class=summary["training"].get("pipeline") or "DiTPipeline",
        pipeline_call=family.pipeline_call if isinstance(family, TextConditioning) else None,
        grid=grid,
        grid_caption=grid_caption,
        training=_Training(summary["training"]),
        duration=format_duration(summary.get("elapsed_s") or summary["training"].get("elapsed_s")),
        metrics={METRIC_NAMES[k]: v for k, v in metrics.items()},
        eval_settings=settings,
        **{
            key: summary.get(key)
            for key in (
                "method",
                "architecture",
                "resolution",
                "trainable_params",
                "trainable_percent",
                "total_params",
                "base_fingerprint",
                "dtype",
                "storage",
            )
        },
        num_classes=summary.get("num_classes"),
        vae=public_name(summary["vae"], subfolders=True),
        vae_local=not resolvable(summary["vae"], subfolders=True),
        final_loss=summary.get("final_loss", summary["training"].get("last_loss")),
    )


def _card_data(base_id: str | None, family: Family, method: str, *, merged: bool, license: str | None) -> ModelCardData:
    """The card's YAML header: base model and relation, library, license, pipeline tag and tags."""
    from huggingface_hub import ModelCardData

    own_license = license is None and base_id in BASE_LICENSE_NAMES
    return ModelCardData(
        base_model=base_id,
        base_model_relation=("finetune" if merged else "adapter") if base_id else None,
        library_name="diffusers" if merged else "difffit",
        license=license or BASE_LICENSES.get(base_id, DEFAULT_LICENSE),
        license_name=BASE_LICENSE_NAMES[base_id] if own_license else None,
        license_link=f"https://huggingface.co/{base_id}" if own_license else None,
        pipeline_tag=family.pipeline_tag,
        tags=["difffit", family.name, "diffusion", method],
    )


class _Training(dict):
    """The adapter's training dict with attribute access for the template; missing keys are None."""

    def __getattr__(self, name: str):
        return self.get(name)


def format_bytes(size: int) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
