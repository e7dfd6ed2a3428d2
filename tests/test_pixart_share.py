"""Sharing PixArt adapters: the model card (text-to-image task, the base's Hub id, prompts instead of classes),
push's upload folder (adapter or merged pipeline) and the HTML report, from a real tiny run. No network."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from t2i_fixtures import make_captioned_data, make_tiny_pixart

from difffit.engine.errors import DiffFitError
from difffit.engine.sharing.card import hub_base_id, model_card
from difffit.engine.sharing.push import push_adapter
from difffit.engine.sharing.report import write_report
from difffit.engine.training.config import FitConfig
from difffit.engine.training.runs import training_summary
from difffit.engine.training.train import fit

PROMPTS = ["a red square", 'a "quoted" blue square']


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pixart-share")
    pipe = make_tiny_pixart(root / "pipe")
    config = FitConfig(
        data=str(make_captioned_data(root / "data")),
        base=str(pipe),
        steps=2,
        batch_size=4,
        save_every=0,
        sample_every=2,
        num_workers=0,
        cache_dir=str(root / "cache"),
        out=str(root / "run"),
        validation_prompts=PROMPTS,
        compile="off",
    )
    return fit(config, progress=False).out_dir


def front_matter(text: str) -> tuple[dict, str]:
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_pixart_aliases_name_their_hub_repos():
    assert hub_base_id("PixArt-alpha-512") == "PixArt-alpha/PixArt-XL-2-512x512"
    assert hub_base_id("PixArt-Sigma-1024") == "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"


def test_card_is_text_to_image_with_the_bases_hub_id(run_dir):
    summary = training_summary(run_dir / "adapter.safetensors") | {"base": "PixArt-alpha-512"}
    meta, body = front_matter(str(model_card(summary, "me/ramen-difffit", grid="grid.png")))
    assert meta["pipeline_tag"] == "text-to-image" and meta["base_model"] == "PixArt-alpha/PixArt-XL-2-512x512"
    assert meta["license"] == "openrail++" and meta["tags"] == ["difffit", "pixart", "diffusion"]
    assert "from text prompts" in body and "## Classes" not in body and "- a red square" in body
    assert "difffit sample hf://me/ramen-difffit -n 16 --prompt 'a red square'" in body
    assert "DiffusionPipeline.from_pretrained" in body and "`PixArtAlphaPipeline`" in body
    merged = front_matter(str(model_card(summary, "me/ramen", merged=True)))[1]
    assert 'pipe("a red square", clean_caption=False)' in merged and "stock diffusers `PixArtAlphaPipeline`" in merged


def test_push_dry_run_of_the_adapter_and_of_the_merged_pipeline(run_dir, tmp_path):
    from diffusers import DiffusionPipeline

    result = push_adapter(run_dir / "adapter.safetensors", "me/ramen", dry_run_out=tmp_path / "up")
    assert result["files"] == ["README.md", "adapter.safetensors", "grid.png"]
    assert front_matter((tmp_path / "up" / "README.md").read_text())[0]["pipeline_tag"] == "text-to-image"
    merged = push_adapter(run_dir / "adapter.safetensors", "me/ramen", merged=True, dry_run_out=tmp_path / "m")
    assert "model_index.json" in merged["files"] and "transformer/config.json" in merged["files"]
    assert not (tmp_path / "m" / ".difffit").exists()  # difffit's local marker stays local
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "m")).__name__ == "PixArtAlphaPipeline"
    with pytest.raises(DiffFitError, match="--grid-classes applies to class-conditional adapters"):
        push_adapter(run_dir / "adapter.safetensors", "me/ramen", grid_classes=["red"], dry_run_out=tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_report_of_a_pixart_run(run_dir, tmp_path):
    path = write_report([run_dir], tmp_path / "report.html")
    text = path.read_text()
    assert "<th>family</th><td>pixart</td>" in text and "<th>captions</th><td>2</td>" in text
    assert text.count("<img") >= 2  # the previews at steps 0 and 2
