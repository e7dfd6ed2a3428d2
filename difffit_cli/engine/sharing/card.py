"""The model card (README.md) of a pushed adapter, through huggingface_hub's ModelCard.

The YAML front matter is `ModelCardData`'s; the body is the Jinja template
`difffit_cli/assets/model_card.md`, rendered by `ModelCard.from_template`.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from difffit_cli.engine.hub import HUB_ID, split_hub_id
from difffit_cli.engine.models.bases import ALIASES, RANDOM_PREFIX
from difffit_cli.engine.models.families import family_named
from difffit_cli.engine.models.families.pixart_bases import ALIASES as PIXART_ALIASES
from difffit_cli.engine.training.runs import format_duration, split_eval

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

TEMPLATE = Path(__file__).resolve().parents[2] / "assets" / "model_card.md"
# Hub repos of the aliases of every family (a PixArt alias names the repo holding its transformer).
ALIAS_REPOS = {**ALIASES, **{name: alias.transformer for name, alias in PIXART_ALIASES.items()}}
# Licenses of the bases difffit knows by name: Meta released DiT's weights under CC-BY-NC 4.0, the PixArt
# team PixArt-α/Σ's under CreativeML Open RAIL++-M.
BASE_LICENSES = {**{hub_id: "cc-by-nc-4.0" for hub_id in ALIASES.values()},
                 **{alias.transformer: "openrail++" for alias in PIXART_ALIASES.values()}}
DEFAULT_LICENSE = "other"
MAX_CLASSES_LISTED = 100
METRIC_NAMES = {"fid": "FID", "kid_mean": "KID", "kid_std": "KID std", "isc_mean": "Inception Score",
                "isc_std": "IS std", "precision": "Precision", "recall": "Recall"}


def hub_base_id(base_spec: str) -> str | None:
    """The hub repo a base spec names (an alias's repo, or a hub id), None for local or random bases."""
    if base_spec in ALIAS_REPOS:
        return ALIAS_REPOS[base_spec]
    if base_spec.startswith(RANDOM_PREFIX) or Path(base_spec).expanduser().exists() or not HUB_ID.match(base_spec):
        return None
    return split_hub_id(base_spec)[0]


def model_card(summary: dict, repo_id: str, *, eval_result: dict | None = None, grid: str | None = None,
               grid_caption: str = "", merged: bool = False, license: str | None = None) -> ModelCard:
    """The card of the adapter described by `summary` (`runs.training_summary`), pushed to `repo_id`.

    `grid`: the sample image's name in the repo; `merged`: the repo holds a merged DiTPipeline
    instead of the adapter; `license`: default, the base's license when difffit knows it, else "other".
    """
    from huggingface_hub import ModelCard, ModelCardData

    base_id = hub_base_id(summary["base"])
    family = family_named(summary.get("family"))
    card_data = ModelCardData(
        base_model=base_id,
        base_model_relation=("finetune" if merged else "adapter") if base_id else None,
        library_name="diffusers" if merged else "difffit",
        license=license or BASE_LICENSES.get(base_id, DEFAULT_LICENSE),
        pipeline_tag=family.pipeline_tag,
        tags=["difffit", family.name, "diffusion", summary["method"]],
    )
    metrics, settings = split_eval(eval_result) if eval_result else ({}, {})
    names = summary.get("class_names") or [str(i) for i in range(summary.get("num_classes") or 0)]
    prompts = summary["training"].get("validation_prompts") or []
    example_prompt = prompts[0] if prompts else "a photo"
    base_text = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{summary['base']}`"
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        repo_id=repo_id,
        merged=merged,
        method_name="DiffFit" if summary["method"] == "difffit" else summary["method"],
        base_text=base_text,
        adapter_size=format_bytes(summary["file_bytes"]),
        class_rows=names[:MAX_CLASSES_LISTED],
        more_classes=max(0, len(names) - MAX_CLASSES_LISTED),
        text=family.conditioning == "text",
        prompt_rows=prompts[:MAX_CLASSES_LISTED],
        example_prompt=example_prompt,
        sample_condition=f"--prompt {shlex.quote(example_prompt)}" if family.conditioning == "text" else
        f"--class {names[0] if ' ' not in names[0] else '0'}",
        pipeline_class=summary["training"].get("pipeline") or "DiTPipeline",
        grid=grid,
        grid_caption=grid_caption,
        training=_Training(summary["training"]),
        duration=format_duration(summary.get("elapsed_s") or summary["training"].get("elapsed_s")),
        metrics={METRIC_NAMES[k]: v for k, v in metrics.items()},
        eval_settings=settings,
        **{key: summary.get(key) for key in (
            "method", "architecture", "resolution", "trainable_params", "trainable_percent",
            "total_params", "base_fingerprint", "vae", "dtype", "storage")},
        num_classes=summary.get("num_classes"),
        final_loss=summary.get("final_loss", summary["training"].get("last_loss")),
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
