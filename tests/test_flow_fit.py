"""DiffFit on tiny SD3 and FLUX pipelines from captioned images: learning, exact resume, every text encoder's
outputs cached once and the encoders freed, the options that do not apply refused in one sentence; sampling
by prompt through the pipelines and merging into pipeline folders that stock diffusers loads."""

from __future__ import annotations

import gc
import json
import os
import re
import weakref

import numpy as np
import pytest
import torch
from t2i_fixtures import make_captioned_data, record_batch_shapes, t2i_fit_config
from test_flow_families import CASES

from difffit.engine.data.images import ImageDataset, scan_image_folder
from difffit.engine.data.latents import encode_distribution
from difffit.engine.data.text_cache import text_embeddings
from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation.sample import SamplingOptions, generate, sample_generators
from difffit.engine.methods.adapter import read_adapter_meta
from difffit.engine.methods.merge import merge_adapter
from difffit.engine.methods.sources import load_source
from difffit.engine.models.families import family_of, load_base
from difffit.engine.training import outputs, train
from difffit.engine.training import setup as fit_setup
from difffit.engine.training.config import FitConfig
from difffit.engine.training.train import fit

FAST = {"steps": 3, "seed": 7, "device": "cpu"}
PROMPTS = ["a red square", "a bowl of ramen, studio light"]


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    return CASES[request.param]


@pytest.fixture(scope="module")
def pipeline_dir(case, tmp_path_factory):
    return case.pipeline(tmp_path_factory.mktemp(case.family.name) / "pipe")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_captioned_data(tmp_path_factory.mktemp("data") / "data")


@pytest.fixture(scope="module")
def trained(case, pipeline_dir, data, tmp_path_factory):
    """One DiffFit run per family, shared by the tests below: 60 steps at a high learning rate."""
    root = tmp_path_factory.mktemp("runs")
    config = dict(
        data=str(data),
        base=str(pipeline_dir),
        batch_size=8,
        lr=2e-2,
        ema=False,
        save_every=30,
        sample_every=0,
        num_workers=0,
        cache_dir=str(root / "cache"),
        adapter_dtype="fp32",
        compile="off",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest's per-test fixture does, which runs after module fixtures: the
    try:  # resume test's runs must sum in the same order as this one
        full = fit(FitConfig(**config, steps=60, out=str(root / "full")), progress=False)
    finally:
        torch.set_num_threads(threads)
    return config, full, root


def config_of(pipeline_dir, data, tmp_path, **overrides):
    return t2i_fit_config(data, pipeline_dir, tmp_path, **{"steps": 2, **overrides})


def fixed_loss(source, data, captions=None) -> float:
    """The flow loss of the data's latents (their means) under their captions at fixed noise levels and noise."""
    base, _ = load_source(str(source))
    family = family_of(base)
    folder = scan_image_folder(data)
    dataset = ImageDataset(folder, base.resolution)
    latents = encode_distribution(base.vae(), torch.stack([dataset[i][0] for i in range(len(folder))]))[:, 0]
    captions = captions or [f"a {p.stem.split('-')[0]} square" for p in folder.files]
    text = text_embeddings(
        captions, family.prompt_encoder(base, "cpu", base.max_text_tokens), key="", cache_dir=None, progress=False
    )
    flow = family.diffusion(base)
    u = torch.linspace(0.05, 0.95, len(latents))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    forward = family.forward(base.model.eval(), base)
    with torch.no_grad():
        losses = flow.training_losses(lambda x, t: forward(x, t, text.take(torch.arange(len(x)))), latents, u, noise)
    return losses["loss"].mean().item()


def test_difffit_learns_the_captioned_data(trained, pipeline_dir, data):
    """The training loss falls, and on the images themselves, at fixed noise, the adapter beats the base (the
    random tiny VAE's posterior is wide, so the per-step loss is noisy: the fixed-noise loss is the clear test)."""
    _, full, _ = trained
    losses = [json.loads(line)["loss"] for line in (full.out_dir / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 60 and np.mean(losses[-15:]) < np.mean(losses[:15])
    assert fixed_loss(full.adapter, data) < 0.85 * fixed_loss(pipeline_dir, data)
    meta = read_adapter_meta(full.adapter)
    assert (
        meta.training["timestep_sampling"] == "logit_normal"
        and meta.training["pipeline"] == load_base(str(pipeline_dir)).pipeline
    )


def test_resume_equals_an_uninterrupted_run(trained, tmp_path):
    from safetensors.torch import load_file

    config, full, root = trained
    fit(FitConfig(**config, steps=30, out=str(tmp_path / "half")), progress=False)
    resumed = fit(FitConfig(**config, steps=60, out=str(tmp_path / "half"), resume=True), progress=False)
    assert resumed.start_step == 30 and resumed.step == 60
    a, b = load_file(str(full.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [
        [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
        for out in (full.out_dir, resumed.out_dir)
    ]
    assert logs[0] == logs[1]


def test_every_encoders_outputs_are_cached_once_and_the_encoders_freed(case, pipeline_dir, data, tmp_path, monkeypatch):
    import transformers

    classes = {
        getattr(transformers, name) for name in ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
    }
    loaded = []
    originals = {cls: cls.from_pretrained.__func__ for cls in classes}

    def remember(cls, *args, **kwargs):
        model = originals[cls](cls, *args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    for cls in classes:
        monkeypatch.setattr(cls, "from_pretrained", classmethod(remember))
    loop = train.train_loop
    seen = {}

    def checked_loop(run, *args, **kwargs):
        gc.collect()
        seen["freed"] = bool(loaded) and all(ref() is None for ref in loaded)
        seen["names"] = set(run.batches.conditions.embeddings.of("a red square"))
        return loop(run, *args, **kwargs)

    monkeypatch.setattr(train, "train_loop", checked_loop)
    fit(config_of(pipeline_dir, data, tmp_path), progress=False)
    encoders = len([p for p in pipeline_dir.glob("text_encoder*")])
    assert len(loaded) == encoders and seen["freed"]  # each encoder loaded once, all gone before the first step
    assert seen["names"] == {"prompt_embeds", "pooled_prompt_embeds"}  # sequence and pooled
    loaded.clear()
    fit(config_of(pipeline_dir, data, tmp_path, out=str(tmp_path / "again")), progress=False)
    assert loaded == []  # every caption came from the cache: no encoder was even loaded


@pytest.mark.parametrize(
    "options, match",
    [
        ({"snr_gamma": 5.0}, "--snr-gamma weights the epsilon-prediction loss, and .* trains by rectified flow"),
        ({"p2_gamma": 1.0}, "--p2-gamma weights the epsilon-prediction loss"),
        ({"method": "adapter-parallel"}, "--method adapter-parallel is not available on"),
        ({"num_heads": 2}, "--num-heads applies to class-conditional"),
        ({"max_text_tokens": 600}, "--max-text-tokens 600 is above 512, the most a .* pipeline reads"),
    ],
)
def test_options_that_do_not_apply_are_refused_before_anything_is_written(pipeline_dir, data, tmp_path, options, match):
    config = config_of(pipeline_dir, data, tmp_path, **options)
    with pytest.raises(DiffFitError, match=match):
        fit(config, progress=False)
    assert not config.out_dir().exists()


def test_compile_compiles_every_block_list(case, pipeline_dir, data, tmp_path, monkeypatch):
    """--compile on compiles each block of each list (FLUX: joint and single blocks); recorded, not compiled."""
    compiled = []
    monkeypatch.setattr(fit_setup, "compile_blocks", lambda model, blocks, dynamic: compiled.append(blocks))
    fit(config_of(pipeline_dir, data, tmp_path, steps=1, compile="on"), progress=False)
    assert compiled == list(case.family.block_lists)
    assert compiled == (["transformer_blocks", "single_transformer_blocks"] if case.packed else ["transformer_blocks"])


def test_timestep_sampling_is_refused_on_epsilon_bases(tmp_path, data):
    from t2i_fixtures import make_tiny_pixart

    config = config_of(make_tiny_pixart(tmp_path / "pixart"), data, tmp_path, timestep_sampling="uniform")
    with pytest.raises(DiffFitError, match="--timestep-sampling applies to rectified-flow bases"):
        fit(config, progress=False)
    assert not config.out_dir().exists()
    with pytest.raises(DiffFitError, match="Unknown --timestep-sampling 'cosine'"):
        FitConfig(data="x", base="y", timestep_sampling="cosine").validate()


def test_timestep_sampling_changes_the_draws(pipeline_dir, data, tmp_path):
    runs = [
        fit(config_of(pipeline_dir, data, tmp_path, timestep_sampling=s, out=str(tmp_path / s)), progress=False)
        for s in ("uniform", "mode")
    ]
    first = [json.loads((r.out_dir / "log.jsonl").read_text().splitlines()[0])["loss"] for r in runs]
    assert first[0] != first[1]
    assert read_adapter_meta(runs[1].adapter).training["timestep_sampling"] == "mode"


# -- sampling and merge ---------------------------------------------------------------------------------------


def test_previews_sample_with_each_familys_defaults(pipeline_dir, data, tmp_path, monkeypatch):
    """Preview grids at step 0 and at the end, with the family's caption dropout (FLUX: 0, and no empty
    caption to guide with), validation prompts and preview steps."""
    steps, sample = [], outputs.generate
    monkeypatch.setattr(
        outputs,
        "generate",
        lambda base, n, options, **kw: steps.append(options.steps) or sample(base, n, options, **kw),
    )
    result = fit(
        config_of(pipeline_dir, data, tmp_path, steps=1, sample_every=1, validation_prompts=["a red square"]),
        progress=False,
    )
    assert {p.name for p in (result.out_dir / "samples").iterdir()} >= {"step-0000000.png", "step-0000001.png"}
    base = load_base(str(pipeline_dir))
    assert steps == [family_of(base.model).preview_sampling(base)["steps"]] * 2


def test_previews_take_at_most_the_pipelines_default_steps(pipeline_dir, monkeypatch):
    """FLUX.1-dev's card samples with 50 steps; its previews with the pipeline's 28; schnell's 4 stay 4."""
    base = load_base(str(pipeline_dir))
    family = family_of(base.model)
    assert family.preview_sampling(base) == {"steps": min(28, family.sampling_defaults(base)["steps"])}
    for card_steps, preview_steps in ((50, 28), (4, 4)):
        monkeypatch.setattr(type(family), "card", lambda self, base, n=card_steps: {"steps": n, "cfg_scale": 3.5})
        assert family.sampling_defaults(base)["steps"] == card_steps
        assert family.preview_sampling(base) == {"steps": preview_steps}


def images(source, n, prompts, **options):
    base, _ = load_source(str(source))
    options = {"cfg_scale": None, "scheduler": None, **FAST, **options}
    return generate(base, n, SamplingOptions(**options), prompts=prompts, progress=False).numpy()


def same_up_to_rounding(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal images but for float rounding: a matmul over another batch size may take another CPU kernel, whose
    rounding (~1e-7) can flip a pixel's uint8 rounding, by one level; seen once in a full-suite run on this
    machine, never alone. At most 1 level of 255, on at most 1% of the values (another prompt or index differs
    by tens of levels on average)."""
    diff = np.abs(a.astype(int) - b.astype(int))
    return diff.max() <= 1 and (diff > 0).mean() <= 0.01


def test_image_i_depends_only_on_seed_prompt_and_i(trained):
    adapter = trained[1].adapter
    three = images(adapter, 3, PROMPTS, batch_size=3)
    assert three.shape == (3, 16, 16, 3)
    assert same_up_to_rounding(images(adapter, 3, PROMPTS, batch_size=1), three)  # not on the batching
    other = images(adapter, 3, ["a red square", "blue stripes"], batch_size=2)
    assert same_up_to_rounding(other[[0, 2]], three[[0, 2]]) and not np.array_equal(other[1], three[1])
    assert not np.array_equal(three[0], three[2])  # same prompt, another index: another image


def test_sampling_uses_the_pipelines_defaults(case, pipeline_dir):
    base = load_base(str(pipeline_dir))
    resolved = SamplingOptions(cfg_scale=None, scheduler=None).for_base(base)
    assert resolved.scheduler == "euler" and resolved.steps == 28  # the pipeline's default, FlowMatchEuler
    assert resolved.cfg_scale == case.family.sampling_defaults(base)["cfg_scale"]
    with pytest.raises(DiffFitError, match="--width 18 is not a multiple of 8 px"):  # diffusers' 8 px
        SamplingOptions(width=18, cfg_scale=None, scheduler=None).for_base(base)
    wide = images(pipeline_dir, 1, PROMPTS, width=32)
    assert wide.shape == (1, 16, 32, 3)


def test_merged_pipeline_loads_in_stock_diffusers_and_draws_the_adapters_images(case, trained, pipeline_dir, tmp_path):
    from diffusers import DiffusionPipeline

    adapter = trained[1].adapter
    summary = merge_adapter(str(adapter), tmp_path / "merged")
    assert summary["format"] == "diffusers" and summary["family"] == case.family.name
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    base = load_base(str(pipeline_dir))
    assert type(pipe).__name__ == base.pipeline
    pipe.set_progress_bar_config(disable=True)
    defaults = case.family.sampling_defaults(base)
    out = pipe(
        PROMPTS + PROMPTS[:1],
        num_inference_steps=3,
        height=16,
        width=16,
        guidance_scale=defaults["cfg_scale"],
        generator=sample_generators(7, range(3)),
        output_type="np",
    ).images
    merged = np.round(out * 255).astype(np.int16)
    assert np.abs(merged - images(adapter, 3, PROMPTS).astype(np.int16)).max() <= 1
    for name in [p.name for p in pipeline_dir.iterdir() if p.is_dir() and p.name != "transformer"]:
        for original in (pipeline_dir / name).iterdir():
            copy = tmp_path / "merged" / name / original.name
            assert copy.read_bytes() == original.read_bytes()
            if os.stat(original).st_dev == os.stat(copy).st_dev:
                assert os.stat(original).st_ino == os.stat(copy).st_ino  # linked, not re-saved


# -- sharing ----------------------------------------------------------------------------------------------------


def test_card_push_and_report(case, trained, tmp_path):
    """The card names the alias's Hub repo and license and shows the family's own diffusers call (no PixArt
    arguments); push --merged uploads a pipeline stock diffusers loads; report shows the family."""
    import yaml
    from diffusers import DiffusionPipeline

    from difffit.engine.sharing.card import model_card
    from difffit.engine.sharing.push import push_adapter
    from difffit.engine.sharing.report import write_report
    from difffit.engine.training.runs import training_summary

    full, pipeline = trained[1], load_base(trained[0]["base"]).pipeline
    alias, repo = list(case.family.kind.aliases.items())[-1]  # SD3.5-large-turbo, FLUX.1-schnell
    summary = training_summary(full.adapter) | {"base": alias}
    header, body = str(model_card(summary, "me/squares")).removeprefix("---\n").split("\n---\n", 1)
    meta = yaml.safe_load(header)
    assert meta["base_model"] == repo.transformer and meta["pipeline_tag"] == "text-to-image"
    for name, each in case.family.kind.aliases.items():  # a license of the base's own: named and linked
        card = yaml.safe_load(str(model_card(summary | {"base": name}, "me/x")).removeprefix("---\n").split("\n---")[0])
        own = {"license_name": each.license_name, "license_link": f"https://huggingface.co/{each.transformer}"}
        expected = {"license": "apache-2.0"} if name == "FLUX.1-schnell" else {"license": "other", **own}
        assert {k: card[k] for k in ("license", "license_name", "license_link") if k in card} == expected
    assert {repo.license_name for repo in case.family.kind.aliases.values()} - {None} == {
        "sd3": {"stabilityai-ai-community"},
        "flux": {"flux-1-dev-non-commercial-license"},
    }[case.family.name]
    assert meta["tags"][:2] == ["difffit", case.family.name]
    assert f"`{pipeline}`" in body
    assert "clean_caption" not in body and re.search(r'pipe\("a (red|blue) square"\)\.images\[0\]', body)
    merged = push_adapter(full.adapter, "me/squares", merged=True, dry_run_out=tmp_path / "m")
    assert "model_index.json" in merged["files"]
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "m")).__name__ == pipeline
    text = write_report([full.out_dir], tmp_path / "report.html").read_text()
    assert f"<th>family</th><td>{case.family.name}</td>" in text


# -- training size ------------------------------------------------------------------------------------------


def test_fit_trains_at_another_resolution_as_it_is(case, pipeline_dir, data, tmp_path, monkeypatch):
    """--resolution on a text-to-image base: latents of that size (no positional move), previews at it, the
    adapter and config.toml record it; a side off the size step, past SD3's positional table, or upscale-res is
    one sentence each, with nothing written."""
    base = load_base(str(pipeline_dir))
    size, side = 2 * base.resolution, 2 * base.resolution // base.vae_factor
    shapes, previews, sample = record_batch_shapes(monkeypatch), [], outputs.generate
    monkeypatch.setattr(
        outputs,
        "generate",
        lambda base, n, options, **kw: (
            previews.append((options.width, options.height)) or sample(base, n, options, **kw)
        ),
    )
    result = fit(config_of(pipeline_dir, data, tmp_path, resolution=size, steps=2, sample_every=2), progress=False)
    assert set(shapes) == {(4, 16, side, side)} and previews == [(size, size)] * 2
    assert read_adapter_meta(result.adapter).training["resolution"] == size
    assert f"resolution = {size}" in (result.out_dir / "config.toml").read_text()
    for options, match in (
        ({"resolution": size + 2}, "--resolution .* is not a multiple of"),
        ({"resolution": size, "pos_embed": "trick"}, "upscale-res moves DiT's fixed positional"),
        *([({"resolution": 4 * size}, "the largest side")] if case.family.name == "sd3" else []),
    ):
        with pytest.raises(DiffFitError, match=match):
            fit(config_of(pipeline_dir, data, tmp_path, out=str(tmp_path / "bad"), **options), progress=False)
        assert not (tmp_path / "bad").exists()
