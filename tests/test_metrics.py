"""eval-fid: our feature pipeline against torch-fidelity's own, caching, inputs, and refusals.

Everything runs on a randomly initialised FID Inception (same architecture and file format as the
real weights), on a dozen 32 px images: the numbers mean nothing, the agreement does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation import inception, metrics
from difffit.engine.evaluation.inception import random_inception_weights
from difffit.engine.io import user_cache_dir

N = 12


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth")


def _write_folder(folder, images):
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="session")
def image_sets(tmp_path_factory):
    """A: uniform noise; B: smooth colour ramps (a different distribution); A also as an npz."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    ramp = np.linspace(0, 1, 32)[None, None, :, None]
    b = (255 * ramp * rng.random((N, 1, 1, 3))).repeat(32, axis=1).astype(np.uint8)
    with open(root / "a.npz", "wb") as f:
        np.savez(f, arr_0=a)
    return {"A": _write_folder(root / "A", a), "B": _write_folder(root / "B", b), "A.npz": root / "a.npz"}


def run(generated, reference, weights, **kwargs):
    kwargs.setdefault("device", "cpu")
    return metrics.evaluate(str(generated), str(reference), inception_weights=str(weights), progress=False, **kwargs)


@pytest.fixture(scope="module")
def ours(image_sets, weights):
    return run(image_sets["A"], image_sets["B"], weights, metrics="fid,kid,isc,prc", kid_subset_size=6)


def test_matches_torch_fidelity(ours, image_sets, weights):
    import torch_fidelity

    theirs = torch_fidelity.calculate_metrics(
        input1=str(image_sets["A"]),
        input2=str(image_sets["B"]),
        cuda=False,
        fid=True,
        kid=True,
        isc=True,
        prc=True,
        feature_extractor="inception-v3-compat",
        feature_layer_prc="2048",
        kid_subset_size=6,
        feature_extractor_weights_path=str(weights),
        cache=False,
        verbose=False,
        save_cpu_ram=True,
    )
    keys = {
        "fid": "frechet_inception_distance",
        "kid_mean": "kernel_inception_distance_mean",
        "kid_std": "kernel_inception_distance_std",
        "isc_mean": "inception_score_mean",
        "isc_std": "inception_score_std",
        "precision": "precision",
        "recall": "recall",
    }
    assert set(ours.metrics) == set(keys)
    for ours_key, their_key in keys.items():
        assert ours.metrics[ours_key] == pytest.approx(theirs[their_key], rel=1e-3, abs=1e-9), ours_key
    assert (ours.num_generated, ours.num_reference) == (N, N)


def test_fid_is_symmetric_and_zero_for_the_same_set(ours, image_sets, weights):
    assert ours.metrics["fid"] > 1.0
    swapped = run(image_sets["B"], image_sets["A"], weights).metrics["fid"]
    assert swapped == pytest.approx(ours.metrics["fid"], rel=1e-5)
    same = run(image_sets["A"], image_sets["A"], weights).metrics["fid"]  # reference A cached just above
    assert abs(same) < 1e-5 * ours.metrics["fid"]


def test_npz_equals_folder(image_sets, weights):
    # -n takes the first images, of an npz and of a folder alike
    packed = run(image_sets["A.npz"], image_sets["B"], weights, num_samples=10).metrics["fid"]
    folder = run(image_sets["A"], image_sets["B"], weights, num_samples=10).metrics["fid"]
    assert packed == pytest.approx(folder, rel=1e-6)


def test_reference_statistics_are_cached_and_saved(image_sets, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFFIT_CACHE", str(tmp_path / "cache"))
    calls = []
    extract = metrics.extract_features

    def counting(images, *args, **kwargs):
        calls.append(kwargs["description"])
        return extract(images, *args, **kwargs)

    monkeypatch.setattr(metrics, "extract_features", counting)
    first = run(
        image_sets["A"], image_sets["B"], weights, metrics="fid,kid", kid_subset_size=6, save_stats=tmp_path / "ref.npz"
    )
    assert first.reference_source == "extracted" and len(calls) == 2
    second = run(image_sets["A"], image_sets["B"], weights, metrics="fid,kid", kid_subset_size=6)
    assert second.reference_source == "cache"
    assert calls[2:] == ["Inception features (generated)"]  # nothing extracted from the reference
    assert second.metrics == pytest.approx(first.metrics, rel=1e-9)
    cached = list((tmp_path / "cache" / "fid-stats").glob("*.npz"))
    assert len(cached) == 1
    fresh, stored = metrics.load_statistics(tmp_path / "ref.npz"), metrics.load_statistics(cached[0])
    np.testing.assert_array_equal(stored.sigma, fresh.sigma)
    # the --save-stats file serves as a reference (KID included: it keeps the features)
    from_file = run(image_sets["A"], tmp_path / "ref.npz", weights, metrics="fid,kid", kid_subset_size=6)
    assert from_file.reference_source == "file" and from_file.num_reference == N
    assert from_file.metrics == pytest.approx(first.metrics, rel=1e-9)
    # touching a reference file changes the key: extracted again
    (image_sets["B"] / "000.png").touch()
    assert run(image_sets["A"], image_sets["B"], weights).reference_source == "extracted"


def test_adm_style_reference_uses_its_mu_sigma(image_sets, weights, tmp_path, monkeypatch):
    stats = run(image_sets["A"], image_sets["B"], weights, save_stats=tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as z:  # ADM batches: images plus float64 mu/sigma, nothing else
        adm = {"arr_0": np.zeros((5, 8, 8, 3), np.uint8), "mu": z["mu"], "sigma": z["sigma"]}
    with open(tmp_path / "adm.npz", "wb") as f:
        np.savez(f, **adm)
    monkeypatch.setattr(metrics, "reference_statistics", None)  # must not be needed
    result = run(image_sets["A"], tmp_path / "adm.npz", weights)
    assert result.reference_source == "file" and result.num_reference == 5
    assert result.metrics["fid"] == pytest.approx(stats.metrics["fid"], rel=1e-9)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A 1-block DiT on 8 px pixel space (identity VAE), saved as an original-layout base file."""
    from safetensors.torch import save_file

    from difffit.engine.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, in_channels=3, hidden_size=384, depth=1, num_heads=6, num_classes=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"difffit.vae": "identity"}
    )
    return path


def test_model_input_is_sampled_in_memory(tiny_base, image_sets, weights, tmp_path, monkeypatch):
    from dataclasses import replace

    from difffit.engine.evaluation.sample import SamplingOptions, generate
    from difffit.engine.methods.sources import load_source

    options = SamplingOptions(scheduler="ddim", steps=2, cfg_scale=1.5, seed=3)
    monkeypatch.chdir(tmp_path)
    result = run(tiny_base, image_sets["B"], weights, num_samples=N, sampling=options, batch_size=5)
    assert result.num_generated == N and list(tmp_path.iterdir()) == []  # nothing written
    base, _ = load_source(str(tiny_base))
    images = generate(base, N, replace(options, batch_size=N), progress=False).numpy()
    with open(tmp_path / "g.npz", "wb") as f:
        np.savez(f, arr_0=images)
    # batch 5 vs 12 moves the DiT's float rounding a little; other images would move FID by far more
    assert result.metrics["fid"] == pytest.approx(
        run(tmp_path / "g.npz", image_sets["B"], weights).metrics["fid"], rel=1e-3
    )


def test_a_sample_folder_is_read_as_its_samples(tiny_base, image_sets, weights, tmp_path):
    """`difffit sample`'s folder carries difffit's marker, which folder scans skip: it is read through its
    manifest, so its samples count (once, in order) and its grid.png does not."""
    from difffit.engine.evaluation.sample import SamplingOptions
    from difffit.engine.evaluation.sample_folder import sample_to_folder
    from difffit.engine.methods.sources import load_source

    base, _ = load_source(str(tiny_base))
    options = SamplingOptions(scheduler="ddim", steps=2, cfg_scale=1.5, seed=3, device="cpu")
    sample_to_folder(base, tmp_path / "samples", N, options, npz=True, progress=False)
    from_folder = run(tmp_path / "samples", image_sets["B"], weights)
    assert from_folder.num_generated == N
    assert from_folder.metrics["fid"] == pytest.approx(
        run(tmp_path / "samples" / "samples.npz", image_sets["B"], weights).metrics["fid"], rel=1e-6
    )


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    with open(root / "floats.npz", "wb") as f:
        np.savez(f, arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with open(root / "noarr.npz", "wb") as f:
        np.savez(f, something=np.zeros(3))
    return root


@pytest.mark.parametrize(
    "generated, reference, extra, expected",
    [
        ("{bad}/empty", "{B}", [], "No images found"),
        ("{bad}/floats.npz", "{B}", [], "expected N x H x W x 3 uint8"),
        ("{A}", "{bad}/noarr.npz", [], "neither images (arr_0) nor statistics"),
        ("{A}", "{bad}/missing.npz", [], "does not exist"),
        ("{A}", "{B}", ["--metrics", "kid"], "KID draws subsets of 1000 images"),
        ("{A}", "{B}", ["--metrics", "fid,lpips"], "Unknown metric 'lpips'"),
    ],
)
def test_bad_input_is_one_sentence(generated, reference, extra, expected, image_sets, bad_inputs, weights):
    paths = {"bad": bad_inputs, "A": image_sets["A"], "B": image_sets["B"]}
    args = [generated.format(**paths), reference.format(**paths), "--inception-weights", str(weights), *extra]
    command = [sys.executable, "-m", "difffit", "eval-fid", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 1
    assert expected in " ".join(done.stderr.split()) and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_missing_weights_offline_fails_fast_naming_the_file(image_sets, weights, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DIFFFIT_NO_DOWNLOAD", "1")
    start = time.perf_counter()
    with pytest.raises(DiffFitError) as info:
        metrics.evaluate(str(image_sets["A"]), str(image_sets["B"]), progress=False)
    assert time.perf_counter() - start < 5
    assert inception.INCEPTION_FILE in info.value.message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in info.value.message
    # put where the message says, it is found without --inception-weights
    import shutil

    target = inception.inception_cache_path()
    target.parent.mkdir(parents=True)
    shutil.copy(weights, target)
    assert inception.resolve_inception_weights() == target


def test_random_weights_are_an_offline_value_cached_once(ours, image_sets, weights, monkeypatch):
    monkeypatch.setenv("DIFFFIT_NO_DOWNLOAD", "1")
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    path = inception.resolve_inception_weights("random")
    assert torch.equal(torch.random.get_rng_state(), before)  # a run's random stream is not disturbed
    assert path.is_relative_to(user_cache_dir())
    made = path.stat().st_mtime_ns
    assert inception.resolve_inception_weights("random") == path and path.stat().st_mtime_ns == made
    cached, seeded = torch.load(path, weights_only=True), torch.load(weights, weights_only=True)
    assert cached.keys() == seeded.keys() and all(torch.equal(cached[k], seeded[k]) for k in cached)
    assert run(image_sets["A"], image_sets["B"], "random").metrics["fid"] == pytest.approx(ours.metrics["fid"])


def test_json_output_has_only_the_asked_metrics(image_sets, weights):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "difffit",
            "eval-fid",
            str(image_sets["A"]),
            str(image_sets["B"]),
            "--inception-weights",
            str(weights),
            "--metrics",
            "fid,isc",
            "--device",
            "cpu",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {"fid", "isc_mean", "isc_std", "num_generated", "num_reference"}
    assert result["num_generated"] == N and result["fid"] > 0


def _cli(monkeypatch, capsys, *args):
    """run_cli with stderr's line wrapping undone, so a message reads as one line."""
    code, out, err = run_cli(monkeypatch, capsys, *args)
    return code, out, " ".join(err.split())


def test_eval_fid_scores_a_folder_that_difffit_sample_wrote(
    tiny_base, image_sets, weights, tmp_path, monkeypatch, capsys
):
    """The pattern of eval-fid's --help: `difffit sample ... --out DIR`, then `difffit eval-fid DIR REFERENCE`."""
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(
        monkeypatch,
        capsys,
        "sample",
        tiny_base,
        "-n",
        "5",
        "--scheduler",
        "ddim",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--npz",
        "--out",
        "samples/x",
    )
    assert code == 0, err
    common = ["--inception-weights", weights, "--device", "cpu", "--json"]
    code, out, err = _cli(monkeypatch, capsys, "eval-fid", "samples/x", image_sets["B"], *common)
    assert code == 0, err  # was: "No images found in samples/x"
    folder = json.loads(out)
    assert folder["num_generated"] == 5  # the PNGs; grid.png is a picture of them, not a sixth sample
    code, out, err = _cli(monkeypatch, capsys, "eval-fid", "samples/x/samples.npz", image_sets["B"], *common)
    assert code == 0, err
    assert folder["fid"] == pytest.approx(json.loads(out)["fid"], rel=1e-6)


def test_save_stats_never_replaces_an_input_or_an_unasked_file(image_sets, weights, tmp_path, monkeypatch, capsys):
    import shutil

    a, b = (shutil.copytree(image_sets[name], tmp_path / name) for name in "AB")  # a failure spoils only copies
    weights = shutil.copy(weights, tmp_path / "inception.pth")
    image = (b / "001.png").read_bytes()
    for target, words in [
        (b / "001.png", "would overwrite the input"),  # was: the image became an npz
        (a / "stats.npz", "would overwrite the input"),  # inside an input folder
        (weights, "would overwrite the input"),
    ]:
        with pytest.raises(DiffFitError, match=words):
            run(a, b, weights, save_stats=target)
    assert (b / "001.png").read_bytes() == image and not (a / "stats.npz").exists()
    existing = tmp_path / "stats.npz"
    existing.write_bytes(b"someone's file")
    with pytest.raises(DiffFitError, match="already exists") as refused:
        run(a, b, weights, save_stats=existing)
    assert "--overwrite" in refused.value.hint and existing.read_bytes() == b"someone's file"
    with pytest.raises(DiffFitError, match="not written by difffit"):  # --overwrite replaces difffit's stats only
        run(a, b, weights, save_stats=existing, overwrite=True)
    assert existing.read_bytes() == b"someone's file"
    run(a, b, weights, save_stats=existing.with_name("ours.npz"))
    existing = existing.with_name("ours.npz")
    code, _, err = _cli(
        monkeypatch,
        capsys,
        "eval-fid",
        a,
        b,
        "--inception-weights",
        weights,
        "--device",
        "cpu",
        "--save-stats",
        existing,
        "--overwrite",
    )
    assert code == 0, err
    assert metrics.load_statistics(existing).count == N
    # A run that fails writes nothing: statistics of another size cannot be compared with the reference's.
    with open(tmp_path / "other.npz", "wb") as f:
        np.savez(f, mu=np.zeros(3), sigma=np.eye(3), count=np.array(50))
    with pytest.raises(DiffFitError, match="statistics of different sizes"):
        run(tmp_path / "other.npz", b, weights, save_stats=tmp_path / "new.npz")
    assert not (tmp_path / "new.npz").exists()


def test_evaluate_takes_an_eval_config_and_keyword_options_replace_its_fields(tmp_path):
    from difffit.engine.evaluation.options import EvalConfig

    config = EvalConfig(metrics="fid,kid", kid_subsets=0)
    with pytest.raises(DiffFitError, match="KID needs --kid-subsets >= 1"):
        metrics.evaluate(str(tmp_path), str(tmp_path), config)
    with pytest.raises(DiffFitError, match="--clip-model is the model of the clip metric"):
        metrics.evaluate(str(tmp_path), str(tmp_path), config, kid_subsets=1, clip_model="any")
    with pytest.raises(TypeError):
        metrics.evaluate(str(tmp_path), str(tmp_path), config, kid_subset=1)  # a misspelt option is refused
