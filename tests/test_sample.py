"""Sampling: reference step parity, the guided loop, per-sample determinism, writers, classes, CLI."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close_amplified, run_cli

from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation.sample import (
    SamplingOptions,
    draw_noise,
    generate,
    generate_batches,
    parse_classes,
    resolve_labels,
    sample_denoised,
    sample_generators,
    to_uint8,
)
from difffit.engine.evaluation.sample_folder import (
    load_pngs,
    sample_to_folder,
    save_grid,
    save_npz,
    save_pngs,
    shard,
)
from difffit.engine.models.diffusion import GaussianDiffusion
from difffit.engine.models.schedulers import make_sampler
from difffit.engine.models.vae import load_vae


@dataclass
class LatentBase:
    """The part of bases.Base that sampling uses: a model, its decoder and what sample.json names."""

    model: torch.nn.Module
    vae_spec: str
    spec: str = "golden"
    fingerprint: str = "0" * 16

    def vae(self, device="cpu", dtype=torch.float32):
        return load_vae(self.vae_spec, device, dtype)


@pytest.fixture
def base(golden_model, tiny_vae_dir):
    """The golden DiT (latent 8, 4 channels, 10 classes) with the tiny factor-2 VAE: 16 px images."""
    return LatentBase(golden_model, str(tiny_vae_dir))


# -- reference parity -----------------------------------------------------------------------------


@pytest.mark.parametrize("name,scheduler,steps", [("s250", "ddpm", 250), ("ddim25", "ddim", 25)])
def test_steps_match_reference(golden, golden_model, name, scheduler, steps):
    sampler = make_sampler(scheduler, steps)
    assert sampler.timesteps == golden[f"{name}.timesteps"].flip(0).tolist()
    index, xt = golden[f"{name}.index"], golden[f"{name}.xt"]
    with torch.no_grad():
        output = golden_model(xt, sampler.diffusion.original_timesteps(index), golden["fwd.y"])

    def step(noise):  # each step of the model output, within what the step amplifies its rounding by
        return lambda o: sampler.step_at(index, o, xt.to(o.dtype), None if noise is None else noise.to(o.dtype))

    if scheduler == "ddim":
        assert_close_amplified(sampler.step_at(index, output, xt, None), golden["ddim25.ddim_prev"], step(None), output)
        return
    assert_close_amplified(sampler.step_at(index, output, xt, None), golden["s250.mean"], step(None), output)
    noise = torch.randn_like(xt)
    expected = golden["s250.mean"] + torch.exp(0.5 * golden["s250.log_variance"]) * noise
    expected[index == 0] = golden["s250.mean"][index == 0]  # the last step adds no noise
    assert_close_amplified(sampler.step_at(index, output, xt, noise), expected, step(noise), output)


def reference_loop(model, labels, seed, spacing, stochastic, cfg_scale, cfg_channels=3):
    """The reference sample.py written out: batch [z, z], labels [y, null], all of it stepped, first half
    kept. The null half's noise is arbitrary: it never reaches the conditional half."""
    diffusion = GaussianDiffusion(spacing)
    gens = sample_generators(seed, range(len(labels)))
    z = draw_noise(gens, (4, 8, 8), "cpu")
    x = torch.cat([z, z])
    y = torch.cat([labels, torch.full_like(labels, model.config.num_classes)])
    for i in reversed(range(diffusion.num_steps)):
        index = torch.full((len(x),), i)
        with torch.no_grad():
            out = model.forward_with_cfg(x, diffusion.original_timesteps(index), y, cfg_scale, cfg_channels)
        pm = diffusion.p_mean_variance(out, x, index)
        if stochastic:
            if i == 0:
                x = pm["mean"]
            else:
                noise = torch.cat([draw_noise(gens, (4, 8, 8), "cpu"), torch.randn_like(z)])
                x = pm["mean"] + torch.exp(0.5 * pm["log_variance"]) * noise
        else:
            abar = diffusion.alphas_cumprod[i].float()
            abar_prev = diffusion.alphas_cumprod_prev[i].float()
            eps = (x / abar.sqrt() - pm["pred_xstart"]) / (1 / abar - 1).sqrt()
            x = pm["pred_xstart"] * abar_prev.sqrt() + (1 - abar_prev).sqrt() * eps
    return x[: len(labels)]


@pytest.mark.parametrize("scheduler,spacing,channels", [("ddpm", "10", 3), ("ddim", "ddim10", "all")])
def test_guided_loop_matches_reference_loop(golden_model, scheduler, spacing, channels):
    labels = torch.tensor([1, 2, 9])
    expected = reference_loop(golden_model, labels, 7, spacing, scheduler == "ddpm", 1.5, channels)
    got = sample_denoised(
        golden_model,
        labels,
        sample_generators(7, range(3)),
        cfg_scale=1.5,
        cfg_channels=channels,
        scheduler=scheduler,
        steps=10,
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # random weights: |x0| reaches ~100


def test_guidance_doubles_the_batch_only_when_guiding(golden_model):
    sizes = []
    hook = golden_model.x_embedder.register_forward_hook(lambda m, args, out: sizes.append(len(args[0])))
    try:
        for scale in (1.0, 4.0):
            sample_denoised(
                golden_model,
                torch.tensor([0, 1, 2]),
                sample_generators(0, range(3)),
                cfg_scale=scale,
                scheduler="ddim",
                steps=2,
            )
    finally:
        hook.remove()
    assert sizes == [3, 3, 6, 6]


def test_unguided_loop_is_a_plain_conditional_loop(golden_model):
    labels = torch.tensor([4, 5])
    diffusion = GaussianDiffusion("ddim5")
    x = draw_noise(sample_generators(3, range(2)), (4, 8, 8), "cpu")
    for i in reversed(range(5)):
        index = torch.full((2,), i)
        with torch.no_grad():
            x = diffusion.ddim_step(golden_model(x, diffusion.original_timesteps(index), labels), x, index)
    got = sample_denoised(
        golden_model, labels, sample_generators(3, range(2)), cfg_scale=1.0, scheduler="ddim", steps=5
    )
    torch.testing.assert_close(got, x, atol=1e-6, rtol=0)


def test_dpm_solver_runs_on_dit_schedule(golden_model):
    sampler = make_sampler("dpm-solver", 8)
    assert len(sampler.timesteps) == 8 and sampler.timesteps[0] > sampler.timesteps[-1]
    betas = sampler.scheduler.betas
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    a = sample_denoised(golden_model, torch.tensor([1, 2]), sample_generators(0, range(2)), scheduler=sampler)
    b = sample_denoised(golden_model, torch.tensor([1, 2]), sample_generators(0, range(2)), scheduler=sampler)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # the multistep history is reset between batches


def test_bad_scheduler_and_steps_refused():
    with pytest.raises(DiffFitError, match="scheduler"):
        make_sampler("euler")
    with pytest.raises(DiffFitError, match="steps"):
        make_sampler("ddpm", 0)
    assert make_sampler("ddim", 37).diffusion.num_steps == 37  # no even stride gives 37: section spacing


# -- determinism ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddpm", "dpm-solver"])
def test_same_seed_same_images_whatever_the_batch_size(base, scheduler):
    def options(**changes):
        return SamplingOptions(**{"scheduler": scheduler, "steps": 4, "seed": 5, **changes})

    one = generate(base, 5, options(batch_size=1), progress=False)
    five = generate(base, 5, options(batch_size=5), progress=False)
    three = generate(base, 5, options(batch_size=3), progress=False)
    assert one.shape == (5, 16, 16, 3) and one.dtype == torch.uint8
    assert (one.int() - five.int()).abs().max() <= 1 and (one.int() - three.int()).abs().max() <= 1
    assert (one != five).float().mean() < 0.01
    other = generate(base, 5, options(batch_size=5, seed=6), progress=False)
    assert (other.int() - five.int()).abs().float().mean() > 5
    # An image depends on its index, not on which other images are made with it.
    ((indices, tail),) = generate_batches(base, [3, 4], options(batch_size=8), progress=False)
    assert indices == [3, 4] and (tail.int() - five[3:].int()).abs().max() <= 1


def test_images_are_decoded_latents_in_reference_pixels(base, golden_model):
    images = generate(base, 2, SamplingOptions(scheduler="ddim", steps=3, seed=1), classes=[3], progress=False)
    latents = sample_denoised(
        golden_model, torch.tensor([3, 3]), sample_generators(1, range(2)), scheduler="ddim", steps=3
    )
    with torch.no_grad():
        decoded = base.vae().decode(latents)
    expected = torch.clamp(127.5 * decoded + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)
    assert torch.equal(images, expected)


def test_pixel_conversion_is_the_reference_one():
    x = torch.tensor([-1.5, -1.0, -0.004, 0.0, 0.5, 0.999, 1.0, 1.3]).view(1, 1, 1, 8).expand(1, 3, 1, 8)
    got = to_uint8(x)
    assert got.shape == (1, 1, 8, 3) and got.dtype == torch.uint8
    assert got[0, 0, :, 0].tolist() == [0, 0, 127, 128, 191, 255, 255, 255]


# -- writers --------------------------------------------------------------------------------------


def images_uint8(n, h=8, w=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=generator, dtype=torch.uint8)


@pytest.mark.parametrize("name", ["samples.npz", "samples"])
def test_npz_has_arr_0_uint8(tmp_path, name):
    images = images_uint8(5)
    path = save_npz(images, tmp_path / name)
    assert path == tmp_path / name and sorted(p.name for p in tmp_path.iterdir()) == [name]
    with np.load(path) as data:
        assert list(data.keys()) == ["arr_0"]
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 8, 6, 3)
        assert np.array_equal(data["arr_0"], images.numpy())


def test_grid_is_near_square_and_row_major(tmp_path):
    from PIL import Image

    images = images_uint8(5)
    grid = np.asarray(Image.open(save_grid(images, tmp_path / "grid.png")))
    assert grid.shape == (16, 18, 3)  # 3 columns, 2 rows of 8x6 images
    assert np.array_equal(grid[8:16, 6:12], images[4].numpy())
    assert grid[8:16, 12:18].max() == 0
    assert np.asarray(Image.open(save_grid(images_uint8(16), tmp_path / "g16.png"))).shape == (32, 24, 3)


def test_pngs_numbered_from_start_and_lossless(tmp_path):
    images = images_uint8(3)
    paths = save_pngs(images, tmp_path, start=7)
    assert [p.name for p in paths] == ["000007.png", "000008.png", "000009.png"]
    assert np.array_equal(load_pngs(paths), images.numpy())
    with pytest.raises(ValueError):
        save_pngs(images.float(), tmp_path)


def test_sample_to_folder_writes_pngs_grid_npz_and_a_manifest(base, tmp_path):
    import json

    options = SamplingOptions(scheduler="ddim", steps=2, batch_size=2, device="cpu")
    summary = sample_to_folder(
        base,
        tmp_path / "out",
        5,
        options,
        classes=[2, 7],
        npz=True,
        progress=False,
        record={"source": "golden.safetensors"},
    )
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert names == [f"{i:06d}.png" for i in range(5)] + ["grid.png", "sample.json", "samples.npz"]
    expected = generate(base, 5, options, classes=[2, 7], progress=False).numpy()
    with np.load(summary["npz"]) as data:
        assert np.array_equal(data["arr_0"], expected)
    settings = json.loads((tmp_path / "out" / "sample.json").read_text())  # written for Python callers too
    assert settings["source"] == "golden.safetensors" and settings["base"] == "golden"
    assert settings["classes"] == [2, 7] and settings["n"] == 5 and settings["steps"] == 2
    assert settings["files"] == names[:5] + ["grid.png", "sample.json", "samples.npz"]
    assert SamplingOptions(**{k: settings[k] for k in options.to_dict()}) == options


def test_resampling_removes_only_what_difffit_wrote(base, tmp_path):
    options = SamplingOptions(scheduler="ddim", steps=2, batch_size=4, device="cpu")
    out = tmp_path / "out"
    sample_to_folder(base, out, 6, options, npz=True, progress=False)
    save_pngs(images_uint8(1, 16, 16), out, start=123)  # a user's own file with a sample's name
    with pytest.raises(DiffFitError, match="already holds samples") as refused:
        sample_to_folder(base, out, 3, options, progress=False)
    assert "--overwrite" in refused.value.hint
    sample_to_folder(base, out, 3, options, progress=False, overwrite=True)
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    # The surplus PNGs and the stale npz of the larger run are gone; the user's file stays.
    assert names == ["000000.png", "000001.png", "000002.png", "000123.png", "grid.png", "sample.json"]
    with pytest.raises(DiffFitError, match="000123.png is not one of difffit's samples"):
        sample_to_folder(base, out, 200, options, progress=False, overwrite=True)
    assert (out / "000123.png").exists()
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "000000.png").write_bytes(b"mine")
    with pytest.raises(DiffFitError, match="did not write"):
        sample_to_folder(base, foreign, 1, options, progress=False, overwrite=True)
    assert (foreign / "000000.png").read_bytes() == b"mine"


def test_sampling_options_checked_when_made():
    assert SamplingOptions().num_steps == 250 and SamplingOptions(scheduler="ddim").num_steps == 50
    assert SamplingOptions(cfg_channels="all").guided_channels == "all" and SamplingOptions().guided_channels == 3
    assert SamplingOptions(mixed_precision="bf16").dtype == torch.bfloat16 and SamplingOptions().dtype == torch.float32
    assert SamplingOptions(scheduler="dpm-solver").to_dict()["steps"] == 25
    for bad, words in [
        ({"cfg_channels": "2"}, "--cfg-channels must be 3 or all"),
        ({"cfg_scale": float("nan")}, "--cfg-scale must be a finite number"),
        ({"cfg_scale": float("inf")}, "--cfg-scale must be a finite number"),
        ({"scheduler": "heun"}, "Unknown scheduler 'heun'"),
        ({"steps": 0}, "--steps must be between 1 and 1000"),
        ({"batch_size": 0}, "--batch-size must be 1 or more"),
        ({"seed": -5}, "--seed must be 0 or more"),
        ({"mixed_precision": "fp8"}, "--mixed-precision must be no, fp16 or bf16"),
        ({"device": "tpu"}, "Unknown device 'tpu'"),
    ]:
        with pytest.raises(DiffFitError, match=words):
            SamplingOptions(**bad)


def test_shards_cover_every_index_once():
    for n, world in [(10, 3), (2, 4), (50000, 8)]:
        parts = [shard(n, r, world) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n))


# -- classes ----------------------------------------------------------------------------


def test_classes_by_name_or_index():
    names = ["apple pie", "Pizza", "sushi"]
    assert parse_classes(["pizza", "2", "apple pie"], names, 3) == [1, 2, 0]
    assert parse_classes([], names, 3) is None
    assert resolve_labels(3, [2, 0], range(5)) == [2, 0, 2, 0, 2]
    assert resolve_labels(3, None, range(2, 6)) == [2, 0, 1, 2]
    with pytest.raises(DiffFitError, match="valid classes: apple pie, Pizza, sushi"):
        parse_classes(["ramen"], names, 3)
    with pytest.raises(DiffFitError, match="out of range"):
        parse_classes(["3"], names, 3)
    with pytest.raises(DiffFitError, match="no class names"):
        parse_classes(["cat"], None, 10)
    many = [f"c{i}" for i in range(30)]
    with pytest.raises(DiffFitError, match=r"c19, \.\.\. \(10 more\)"):
        parse_classes(["dog"], many, 30)


# -- the command ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_file(tmp_path_factory, tiny_vae_dir):
    """A 2-block, 384-wide DiT base file (8x8 latents) naming the tiny VAE: 16 px images."""
    import json

    from safetensors.torch import save_file

    from difffit.engine.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, hidden_size=384, depth=2, num_heads=6, num_classes=10))
    with torch.no_grad():  # the reference init zeroes the output layers; make every weight matter
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    metadata = {"difffit.vae": str(tiny_vae_dir), "difffit.class_names": json.dumps(list("abcdefghij"))}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    return path


def make_adapter(base_file, path, seed):
    """An adapter as fit leaves one: 3 named classes, perturbed trainable tensors (fp32: exact)."""
    import copy

    from difffit.engine.methods.adapter import make_meta, save_adapter
    from difffit.engine.methods.trainable import prepare_model, trainable_parameters
    from difffit.engine.models.families import load_base

    base = load_base(str(base_file))
    model = copy.deepcopy(base.model)
    prepare_model(model, "difffit", num_classes=3)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.2)
    meta = make_meta(base, model.eval(), "difffit", new_class_table=True, class_names=["cat", "dog", "owl"])
    save_adapter(path, model, base.model.state_dict(), meta, dtype="fp32")
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, base_file):
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for seed, name in [(1, "cats"), (2, "birds")]:
        (root / name).mkdir()
        paths.append(make_adapter(base_file, root / name / "adapter.safetensors", seed))
    return paths


FAST = ("-n", "3", "--scheduler", "ddim", "--steps", "3", "--batch-size", "2", "--device", "cpu")


def test_two_adapters_in_one_run_equal_two_runs(adapters, tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "sample", *adapters, *FAST, "--class", "dog", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [o["dir"] for o in report["outputs"]] == ["samples/cats", "samples/birds"]
    together = [load_pngs(sorted((tmp_path / "samples" / name).glob("0*.png"))) for name in ("cats", "birds")]
    for adapter, images in zip(adapters, together, strict=True):
        code, _, err = run_cli(
            monkeypatch, capsys, "sample", adapter, *FAST, "--class", "dog", "--out", tmp_path / "alone", "--overwrite"
        )
        assert code == 0, err
        assert np.array_equal(load_pngs(sorted((tmp_path / "alone").glob("0*.png"))), images)
    assert not np.array_equal(together[0], together[1])  # the adapters differ, and so do their images
    settings = json.loads((tmp_path / "samples" / "cats" / "sample.json").read_text())
    assert settings["classes"] == [1] and settings["scheduler"] == "ddim"
    assert (tmp_path / "samples" / "cats" / "grid.png").exists()


def test_sample_base_file_with_npz(base_file, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "sample",
        base_file,
        *FAST,
        "--npz",
        "--class",
        "4",
        "--out",
        tmp_path / "out",
        "--cfg-scale",
        "1.5",
        "--cfg-channels",
        "all",
    )
    assert code == 0, err
    with np.load(tmp_path / "out" / "samples.npz") as data:
        arr = data["arr_0"]
    assert arr.shape == (3, 16, 16, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr, load_pngs(sorted((tmp_path / "out").glob("0*.png"))))


@pytest.mark.parametrize(
    "extra,words",
    [
        (("--class", "ramen"), "Unknown class 'ramen'; valid classes: cat, dog, owl."),
        (("--class", "7"), "out of range"),
        (("--scheduler", "heun"), "Unknown scheduler"),
        (("--cfg-channels", "2"), "--cfg-channels must be 3 or all"),
    ],
)
def test_bad_input_refused_in_one_line(adapters, tmp_path, monkeypatch, capsys, extra, words):
    args = ("sample", adapters[0], *FAST, *extra, "--out", tmp_path / "o")
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and out == ""
    assert "Traceback" not in err and words in err, err
    assert not list((tmp_path / "o").glob("*.png"))


def test_adapter_whose_base_is_missing_is_refused(base_file, tmp_path, monkeypatch, capsys):
    import shutil

    moved = tmp_path / "base.safetensors"
    shutil.copy(base_file, moved)
    adapter = make_adapter(moved, tmp_path / "adapter.safetensors", seed=3)
    moved.unlink()
    code, out, err = run_cli(monkeypatch, capsys, "sample", adapter, *FAST, "--out", tmp_path / "x")
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.startswith("Error:") and str(moved) in err.replace("\n", ""), err


def test_compiled_sampling_matches_eager_with_a_padded_last_batch(golden_model, tiny_vae_dir):
    """Each block compiled once at a fixed batch; the last batch (1 of 2) is padded and cut back."""
    import copy

    eager = SamplingOptions(scheduler="ddim", steps=2, batch_size=2, device="cpu", cfg_scale=1.5)
    a = generate(LatentBase(golden_model, str(tiny_vae_dir)), 3, eager, classes=[1, 2, 3], progress=False)
    compiled_base = LatentBase(copy.deepcopy(golden_model), str(tiny_vae_dir))  # compiling changes the model
    b = generate(compiled_base, 3, replace(eager, compile="on"), classes=[1, 2, 3], progress=False)
    assert b.shape == a.shape == (3, 16, 16, 3)
    assert (a.int() - b.int()).abs().max() <= 1  # uint8 levels: compiled kernels round differently


def test_a_manifest_never_reaches_outside_its_folder(base, tmp_path):
    import json

    options = SamplingOptions(scheduler="ddim", steps=2, batch_size=2, device="cpu")
    out = tmp_path / "out"
    sample_to_folder(base, out, 1, options, progress=False)
    (tmp_path / "precious.txt").write_text("mine")
    manifest = json.loads((out / "sample.json").read_text())
    manifest["files"].append("../precious.txt")  # an edited or foreign sample.json
    (out / "sample.json").write_text(json.dumps(manifest))
    sample_to_folder(base, out, 1, options, progress=False, overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "mine"


# -- interrupted and concurrent runs ----------------------------------------------------------------------


def _interrupt_after_first_batch(monkeypatch):
    import difffit.engine.evaluation.sample_folder as sample_folder

    real, calls = sample_folder.save_pngs, []

    def save_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # Ctrl-C while the second batch is written
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_folder, "save_pngs", save_then_interrupt)


def test_an_interrupted_sample_never_passes_for_a_finished_one(base, tmp_path, monkeypatch):
    import json

    from difffit.engine.evaluation.image_sets import FolderImages

    options = SamplingOptions(scheduler="ddim", steps=2, batch_size=2, device="cpu")
    out = tmp_path / "out"
    sample_to_folder(base, out, 6, options, progress=False)
    assert json.loads((out / "sample.json").read_text())["complete"] is True
    with monkeypatch.context() as patched:
        _interrupt_after_first_batch(patched)
        with pytest.raises(KeyboardInterrupt):
            sample_to_folder(base, out, 6, replace(options, seed=7), progress=False, overwrite=True)
    manifest = json.loads((out / "sample.json").read_text())
    assert manifest["complete"] is False and manifest["seed"] == 7  # not the finished seed-0 run it replaces
    # Only the new run's first batch is there: no seed-0 images mixed in under the new manifest.
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "000000.png",
        "000001.png",
        "sample.json",
    ]
    with pytest.raises(DiffFitError, match="unfinished `difffit sample` run"):
        FolderImages(out)
    with pytest.raises(DiffFitError, match="already holds samples of an unfinished run"):
        sample_to_folder(base, out, 6, replace(options, seed=7), progress=False)
    sample_to_folder(base, out, 6, replace(options, seed=7), progress=False, overwrite=True)
    clean = sample_to_folder(base, tmp_path / "clean", 6, replace(options, seed=7), progress=False)
    assert np.array_equal(load_pngs(sorted(out.glob("0*.png"))), load_pngs(sorted(Path(clean["dir"]).glob("0*.png"))))
    assert json.loads((out / "sample.json").read_text())["complete"] is True
    assert FolderImages(out).count == 6  # the grid is not a sample


def test_an_interrupted_first_sample_can_be_replaced(base, tmp_path, monkeypatch):
    options = SamplingOptions(scheduler="ddim", steps=2, batch_size=2, device="cpu")
    out = tmp_path / "fresh"
    with monkeypatch.context() as patched:
        _interrupt_after_first_batch(patched)
        with pytest.raises(KeyboardInterrupt):
            sample_to_folder(base, out, 4, options, progress=False)
    sample_to_folder(base, out, 4, options, progress=False, overwrite=True)  # was: "did not write"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [f"{i:06d}.png" for i in range(4)] + [
        "grid.png",
        "sample.json",
    ]


def test_a_second_sample_into_a_folder_in_use_is_refused(base, tmp_path):
    from difffit.engine.io import LOCK, run_lock

    options = SamplingOptions(scheduler="ddim", steps=2, batch_size=2, device="cpu")
    out = tmp_path / "cs"
    with run_lock(out), pytest.raises(DiffFitError, match="in use by another difffit run"):
        sample_to_folder(base, out, 2, options, progress=False)
    assert [p.name for p in out.iterdir()] == [LOCK]  # the refused run wrote nothing
    sample_to_folder(base, out, 2, options, progress=False)
    with run_lock(out), pytest.raises(DiffFitError, match="in use by another difffit run"):
        sample_to_folder(base, out, 2, options, progress=False)  # not "already holds samples": it is in use
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "mine.png").write_bytes(b"mine")
    with pytest.raises(DiffFitError, match="did not write"):
        sample_to_folder(base, foreign, 1, options, progress=False, overwrite=True)
    assert [p.name for p in foreign.iterdir()] == ["mine.png"]  # not even a lock file
