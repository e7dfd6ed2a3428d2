"""Sampling PixArt adapters and bases by prompt, and merging them into pipeline folders that stock diffusers
loads and that draw the adapter's images. Tiny pipelines built in the test; nothing is downloaded."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from t2i_fixtures import make_tiny_pixart
from test_pixart import trained_adapter

from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation.sample import SamplingOptions, generate, sample_generators
from difffit.engine.evaluation.sample_folder import load_pngs
from difffit.engine.methods.merge import merge_adapter
from difffit.engine.methods.sources import load_source, sample_sources
from difffit.engine.models.families import load_base

FAST = {"steps": 3, "seed": 7, "device": "cpu"}
PROMPTS = ["a red square", "a bowl of ramen, studio light"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return make_tiny_pixart(tmp_path_factory.mktemp("pixart") / "pipe")


@pytest.fixture(scope="module")
def adapter(pipeline_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    trained_adapter(pipeline_dir, path, "difffit", dtype="fp32")
    return path


def images(source, n, prompts, **options):
    base, _ = load_source(str(source))
    options = {"cfg_scale": None, "scheduler": None, **FAST, **options}
    return generate(base, n, SamplingOptions(**options), prompts=prompts, progress=False).numpy()


def test_image_i_depends_only_on_seed_prompt_and_i(adapter):
    three = images(adapter, 3, PROMPTS, batch_size=3)
    assert np.array_equal(images(adapter, 3, PROMPTS, batch_size=1), three)  # not on the batching
    other = images(adapter, 3, ["a red square", "blue stripes"], batch_size=2)
    assert np.array_equal(other[[0, 2]], three[[0, 2]]) and not np.array_equal(other[1], three[1])
    assert not np.array_equal(images(adapter, 1, PROMPTS, seed=8)[0], three[0])
    assert not np.array_equal(three[0], three[2])  # same prompt, another index: another image


def test_sample_folder_records_each_images_prompt(adapter, tmp_path):
    options = SamplingOptions(cfg_scale=None, scheduler=None, **FAST)
    summary = sample_sources([str(adapter)], 3, options, out=tmp_path / "out", prompts=PROMPTS, progress=False)
    record = json.loads((tmp_path / "out" / "sample.json").read_text())
    assert record["prompts"] == [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    assert record["cfg_scale"] == 4.5 and record["scheduler"] == "dpm-solver" and record["steps"] == 3
    assert record["adapter"]["family"] == "pixart" and record["classes"] is None
    assert summary["cfg_scale"] == 4.5
    pngs = load_pngs([tmp_path / "out" / f"{i:06d}.png" for i in range(3)])
    assert np.array_equal(pngs, images(adapter, 3, PROMPTS))


def test_the_pipelines_defaults_and_other_schedulers(pipeline_dir, tiny_base_file):
    base = load_base(str(pipeline_dir))
    resolved = SamplingOptions(cfg_scale=None, scheduler=None).for_base(base)
    assert (resolved.cfg_scale, resolved.scheduler, resolved.steps) == (4.5, "dpm-solver", 20)
    dit = SamplingOptions(cfg_scale=None, scheduler=None).for_base(load_base(str(tiny_base_file)))
    assert (dit.cfg_scale, dit.scheduler, dit.num_steps) == (4.0, "ddpm", 250)  # DiT's own defaults
    ddim = images(pipeline_dir, 1, PROMPTS, scheduler="ddim")
    assert not np.array_equal(ddim, images(pipeline_dir, 1, PROMPTS))
    wide = images(pipeline_dir, 1, PROMPTS, width=32, height=16)
    assert wide.shape == (1, 16, 32, 3)


def test_what_does_not_apply_is_refused_before_anything_is_written(pipeline_dir, tiny_base_file, tmp_path):
    options = SamplingOptions(cfg_scale=None, scheduler=None, **FAST)
    cases = [
        (str(pipeline_dir), {"classes": ["red"]}, "--class does not apply to .* a PixArt base"),
        (str(pipeline_dir), {}, "text-to-image base; give it --prompt"),
        (str(tiny_base_file), {"prompts": ["a cat"]}, "--prompt does not apply to .* a DiT base"),
    ]
    for source, conditions, message in cases:
        with pytest.raises(DiffFitError, match=message):
            sample_sources([source], 2, options, out=tmp_path / "out", progress=False, **conditions)
        assert not (tmp_path / "out").exists()
    for bad in ({"width": 20}, {"scheduler": "ddpm", "steps": 2000}):
        with pytest.raises(DiffFitError):
            sample_sources(
                [str(pipeline_dir)],
                1,
                SamplingOptions(**{"cfg_scale": None, "scheduler": None, **FAST, **bad}),
                out=tmp_path / "out",
                prompts=PROMPTS,
                progress=False,
            )
        assert not (tmp_path / "out").exists()
    with pytest.raises(DiffFitError, match="apply to text-to-image bases"):
        sample_sources([str(tiny_base_file)], 1, SamplingOptions(width=32), out=tmp_path / "out", progress=False)
    with pytest.raises(DiffFitError, match="--scheduler pipeline is not one of DiT's"):
        sample_sources(
            [str(tiny_base_file)], 1, SamplingOptions(scheduler="pipeline"), out=tmp_path / "out", progress=False
        )
    assert not (tmp_path / "out").exists()


def test_a_long_prompt_is_cut_as_the_pipeline_does_with_a_warning(pipeline_dir, capsys):
    long = " ".join(["a red square"] * 60)  # far past the pipeline's 120 tokens
    cut = images(pipeline_dir, 1, [long])
    assert "1 prompt is longer than 120 tokens; its end is cut" in capsys.readouterr().err.replace("\n", " ")
    assert cut.shape == (1, 16, 16, 3)


def test_prompts_file_errors_are_one_sentence(tmp_path):
    from difffit.engine.evaluation.sample import read_prompts

    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "bom.txt").write_bytes("\ufeffa cat\n".encode())  # as Notepad saves UTF-8: the mark is no prompt
    assert read_prompts(tmp_path / "bom.txt") == ["a cat"]
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DiffFitError, match="not UTF-8"):
        read_prompts(tmp_path / "bad.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DiffFitError, match="holds no prompt"):
        read_prompts(tmp_path / "empty.txt")


# -- merge ------------------------------------------------------------------------------------------------------


def test_merged_pipeline_loads_in_stock_diffusers_and_draws_the_adapters_images(adapter, pipeline_dir, tmp_path):
    from diffusers import DiffusionPipeline

    modes = {p: p.stat().st_mode for p in pipeline_dir.rglob("*") if p.is_file()}
    summary = merge_adapter(str(adapter), tmp_path / "merged")
    assert summary["format"] == "diffusers" and summary["family"] == "pixart" and "num_classes" not in summary
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert type(pipe).__name__ == "PixArtAlphaPipeline"
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPTS + PROMPTS[:1],
        negative_prompt="",
        num_inference_steps=3,
        height=16,
        width=16,
        generator=sample_generators(7, range(3)),
        use_resolution_binning=False,
        clean_caption=False,
        output_type="np",
    ).images
    merged = np.round(out * 255).astype(np.int16)
    assert np.abs(merged - images(adapter, 3, PROMPTS).astype(np.int16)).max() <= 1
    # Unchanged components are the base's files (linked, or copied byte for byte), never re-saved.
    for name in ("text_encoder", "tokenizer", "vae", "scheduler"):
        for original in (pipeline_dir / name).iterdir():
            copy = tmp_path / "merged" / name / original.name
            assert copy.read_bytes() == original.read_bytes()
            if os.stat(original).st_dev == os.stat(copy).st_dev:
                assert os.stat(original).st_ino == os.stat(copy).st_ino
    assert {p: p.stat().st_mode for p in pipeline_dir.rglob("*") if p.is_file()} == modes  # the base untouched
    # A merged pipeline is a base like any other, with the adapter's weights in it.
    assert np.abs(images(tmp_path / "merged", 1, PROMPTS).astype(int) - images(adapter, 1, PROMPTS)).max() <= 1


def test_merge_refuses_what_a_pixart_adapter_cannot_be(adapter, tmp_path):
    with pytest.raises(DiffFitError, match="--format original is not available for PixArt adapters"):
        merge_adapter(str(adapter), tmp_path / "m.safetensors", fmt="original")
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.raises(DiffFitError, match="exports LoRA adapters only"):
        merge_adapter(str(adapter), tmp_path / "peft", fmt="peft")


def test_lora_exports_for_peft_onto_the_diffusers_transformer(pipeline_dir, tmp_path):
    from peft import PeftModel

    expected, _ = trained_adapter(pipeline_dir, tmp_path / "lora.safetensors", "lora")
    merge_adapter(str(tmp_path / "lora.safetensors"), tmp_path / "peft", fmt="peft")
    base = load_base(str(pipeline_dir))
    model = PeftModel.from_pretrained(base.model, tmp_path / "peft")
    from test_pixart import run

    torch.testing.assert_close(run(model), expected, atol=1e-6, rtol=1e-6)


def test_eval_fid_scores_a_pixart_sample_folder_against_its_prompts(adapter, tmp_path):
    """The contract with eval-fid: `sample --prompt` writes the prompts, `eval-fid --metrics clip` reads them
    (and matches a direct CLIP score of the same images and prompts)."""
    from t2i_fixtures import save_tiny_clip

    from difffit.engine.evaluation.clip_score import clip_score
    from difffit.engine.evaluation.metrics import evaluate

    clip = save_tiny_clip(tmp_path / "clip")
    options = SamplingOptions(cfg_scale=None, scheduler=None, **FAST)
    sample_sources([str(adapter)], 3, options, out=tmp_path / "s", prompts=PROMPTS, progress=False)
    result = evaluate(str(tmp_path / "s"), metrics="clip", clip_model=str(clip), device="cpu", progress=False)
    pngs = load_pngs([tmp_path / "s" / f"{i:06d}.png" for i in range(3)])
    direct = clip_score(pngs, [PROMPTS[0], PROMPTS[1], PROMPTS[0]], model=str(clip), device="cpu", progress=False)
    assert result.metrics["clip_score"] == pytest.approx(direct, rel=1e-5)
