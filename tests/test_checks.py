"""Inputs that cannot work are refused at once, in one sentence that says what is wrong (issue 19, part 3):
where a source lives, option bounds, internal errors, NaN, misleading messages, adapter integrity."""

from __future__ import annotations

import json
import math
import shutil
import struct

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_sample import FAST, adapters, base_file  # noqa: F401 - fixtures

from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation.sample import SamplingOptions
from difffit.engine.hub import HubRef, hub_ref
from difffit.engine.io import atomic_path
from difffit.engine.methods.adapter import make_meta, read_adapter, save_adapter, tensors_checksum
from difffit.engine.methods.baselines import MethodSettings
from difffit.engine.methods.hub_adapters import resolve_adapter_source
from difffit.engine.methods.merge import merge_adapter
from difffit.engine.methods.sources import describe_source, load_source, sample_sources
from difffit.engine.methods.trainable import prepare_model
from difffit.engine.models.families import load_base
from difffit.engine.training.config import FitConfig
from difffit.engine.training.setup import check_base_shapes, check_data
from difffit.engine.training.train import fit

CHEAP = SamplingOptions(scheduler="ddim", steps=2, batch_size=2, device="cpu")


@pytest.fixture
def hub_calls(monkeypatch) -> list:
    """Downloads on, and every huggingface_hub entry point difffit uses recording its call and failing."""
    import huggingface_hub
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("DIFFFIT_NO_DOWNLOAD", "0")
    calls = []

    def record(name):
        def call(*args, **kwargs):
            calls.append((name, args))
            raise OSError("the test has no network")

        return call

    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, record(name))
    monkeypatch.setattr(HfApi, "list_repo_files", lambda self, repo_id: record("list_repo_files")(repo_id))
    return calls


def squash(text: str) -> str:
    """Text without whitespace: Rich wraps long lines (and paths) wherever the terminal ends."""
    return "".join(text.split())


def corrupt_with_nan(adapter, out) -> str:
    """A copy of `adapter` holding a NaN, with a checksum that matches it (as a diverged run writes it)."""
    tensors = load_file(str(adapter))
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    with safe_open(str(adapter), "pt") as reader:
        meta = json.loads(reader.metadata()["difffit"])
    save_file(tensors, str(out), metadata={"difffit": json.dumps(meta | {"checksum": tensors_checksum(tensors)})})
    return name


# -- 1. where a source lives --------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "runs/nope/adapter.safetensors",
        "nope.safetensors",
        "models/nope.pt",
        "nope.pth",
        "./nope",
        "/abs/nope",
        "~/nope-difffit",
        "a/b/c",
    ],
)
def test_a_mistyped_local_path_never_reaches_the_hub(hub_calls, tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    assert hub_ref(spec) is None
    for attempt in (
        lambda: load_source(spec),
        lambda: describe_source(spec),
        lambda: merge_adapter(spec, tmp_path / "m.safetensors"),
    ):
        with pytest.raises(DiffFitError, match="does not exist"):
            attempt()
    assert hub_calls == []


def test_only_hf_addresses_and_bare_owner_name_go_to_the_hub(hub_calls):
    assert hub_ref("me/x") == HubRef("me/x")
    assert hub_ref("hf://me/x") == HubRef("me/x", explicit=True)
    assert hub_ref("hf://me/x/sub/a.safetensors") == HubRef("me/x", "sub/a.safetensors", explicit=True)
    assert hub_ref("facebook/DiT-XL-2-256/vae") is None  # a base or source: local
    assert hub_ref("facebook/DiT-XL-2-256/vae", subfolders=True) == HubRef("facebook/DiT-XL-2-256", "vae")
    assert hub_ref("tiny") is None and hub_ref("random:DiT-S/2") is None
    for spec, words in [
        ("hf://", "needs an owner and a name"),
        ("hf://me", "needs an owner and a name"),
        ("hf://me//x", "needs an owner and a name"),
        ("hf://me/x y", "'x y' holds characters"),
    ]:
        with pytest.raises(DiffFitError, match=words):
            hub_ref(spec)
    with pytest.raises(DiffFitError, match="does not exist"):
        load_base("me/x/y")  # more than one "/": a local path, not a subfolder of a hub repo
    assert hub_calls == []


def test_a_missing_hub_adapter_says_what_is_wrong(hub_calls, hf_home):
    with pytest.raises(DiffFitError) as online:
        resolve_adapter_source("hf://me/x")
    assert "could not be listed on the Hub (the test has no network)" in online.value.message
    assert "hf://OWNER/NAME" not in (online.value.hint or "")  # what the user already wrote
    assert [name for name, _ in hub_calls] == ["snapshot_download", "list_repo_files"]


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf"


# -- 3. option bounds, refused before anything is built -----------------------------------------


def fit_config(**options) -> FitConfig:
    return FitConfig.from_options({"data": "images", "base": "tiny", "steps": 1, "batch_size": 4, **options})


@pytest.mark.parametrize(
    "method, option, limit",
    [
        ("lora", "rank", 128),  # the tiny base is 128 wide
        ("adapter-parallel", "adapter_dim", 128),
        ("vpt-deep", "prompt_tokens", 64),  # 8 x 8 tokens at 32 px with patch 4
    ],
)
def test_method_sizes_are_bounded_by_the_architecture_before_any_model_is_built(monkeypatch, method, option, limit):
    monkeypatch.setattr("difffit.engine.models.families.dit.load_dit_base", lambda *a, **k: pytest.fail("base loaded"))
    check_base_shapes(fit_config(method=method, **{option: limit}).validate())  # the largest the model can use
    for value in (limit + 1, 100_000):
        with pytest.raises(DiffFitError, match=f"--{option.replace('_', '-')} {value} is above .*{limit}"):
            check_base_shapes(fit_config(method=method, **{option: value}).validate())


def test_bounds_on_a_random_base_follow_its_size():
    config = dict(base="random:DiT-S/2", vae="identity", resolution=32, method="vpt-deep")
    check_base_shapes(fit_config(**config, prompt_tokens=256).validate())  # 16 x 16 tokens
    with pytest.raises(DiffFitError, match="above the 256 image tokens"):
        check_base_shapes(fit_config(**config, prompt_tokens=257).validate())
    with pytest.raises(DiffFitError, match="--rank 385 is above 384"):
        check_base_shapes(fit_config(**config | {"method": "lora"}, rank=385).validate())


def test_a_base_read_only_when_loaded_is_bounded_before_the_latents(tmp_path, toy_data, tiny_base_file, tiny_vae_dir):
    """A .pt base's shapes are known only once it is loaded: refused then, before latents or LoRA layers."""
    pt = tmp_path / "base.pt"
    torch.save(load_file(str(tiny_base_file)), pt)
    config = FitConfig(
        data=str(toy_data),
        base=str(pt),
        vae=str(tiny_vae_dir),
        method="lora",
        method_settings=MethodSettings(rank=10**9),
        num_heads=6,
        steps=1,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
        out=str(tmp_path / "run"),
        num_workers=0,
    )
    check_base_shapes(config.validate())  # nothing to read the architecture from yet
    with pytest.raises(DiffFitError, match="--rank 1000000000 is above 384"):
        fit(config, progress=False)
    assert not (tmp_path / "cache").exists()


def test_repeats_and_batch_size_are_bounded_by_the_data(tmp_path, toy_data, tiny_base_file, tiny_vae_dir):
    with pytest.raises(DiffFitError, match="--repeats 100,000,000 is above the limit of 10,000,000"):
        fit_config(repeats=100_000_000).validate()
    with pytest.raises(DiffFitError, match="--repeats 20,000,000 is above"):
        fit_config(repeats={"red": 20_000_000}).validate()
    from difffit.engine.data.images import scan_image_folder

    folder = scan_image_folder(str(toy_data))  # 12 images, 6 per class
    check_data(fit_config(batch_size=12), folder)
    check_data(fit_config(batch_size=24, repeats=2), folder)
    check_data(fit_config(batch_size=24, repeats={"red": 3}), folder)  # 6 blue + 18 red
    check_data(fit_config(batch_size=36, repeats={"red": 5}, class_balance=True), folder)  # 2 x 30 per epoch
    with pytest.raises(DiffFitError, match="--batch-size 13 is larger than the 12 images of an epoch"):
        check_data(fit_config(batch_size=13), folder)
    with pytest.raises(DiffFitError, match="makes an epoch of 12,000,000 items; the limit is 10,000,000"):
        check_data(fit_config(repeats=1_000_000), folder)
    config = FitConfig(
        data=str(toy_data),
        base=str(tiny_base_file),
        vae=str(tiny_vae_dir),
        steps=1,
        batch_size=16,
        cache_dir=str(tmp_path / "cache"),
        out=str(tmp_path / "run"),
        num_workers=0,
    )
    with pytest.raises(DiffFitError, match="--batch-size 16 is larger"):
        fit(config, progress=False)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("data", ["hf:", "hf::train", "hf:a/b/c", "hf:/x"])
def test_an_hf_dataset_spec_without_a_name_is_one_sentence(data):
    with pytest.raises(DiffFitError, match=f"{data} does not name a Hugging Face dataset"):
        fit_config(data=data).validate()
    with pytest.raises(DiffFitError, match="does not name"):
        fit_config(val_data=data, data="images").validate()


# -- 4. sentences instead of internal errors ----------------------------------------------------


def test_one_ddpm_or_ddim_step_is_refused_and_two_sample():
    for scheduler in ("ddpm", "ddim"):
        with pytest.raises(DiffFitError, match=f"--scheduler {scheduler} needs 2 or more --steps"):
            SamplingOptions(scheduler=scheduler, steps=1)
    assert SamplingOptions(scheduler="dpm-solver", steps=1).num_steps == 1
    base = load_base("tiny")
    from difffit.engine.evaluation.sample import generate

    for scheduler in ("ddpm", "ddim"):
        images = generate(base, 1, SamplingOptions(scheduler=scheduler, steps=2, device="cpu"), progress=False)
        assert images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("num_classes", [-5, 0])
def test_num_classes_below_one_is_refused(num_classes):
    with pytest.raises(DiffFitError, match=f"--num-classes must be 1 or more \\(got {num_classes}\\)"):
        describe_source("tiny", method="lora", num_classes=num_classes)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -1.0])
def test_lora_alpha_must_be_a_positive_number(alpha):
    with pytest.raises(DiffFitError, match="--lora-alpha must be a positive number"):
        MethodSettings(lora_alpha=alpha).validate()
    with pytest.raises(DiffFitError, match="--lora-alpha must be a positive number"):
        fit_config(method="lora", lora_alpha=alpha).validate()


def test_a_corrupt_state_json_falls_back_to_the_previous_checkpoint(
    tmp_path, toy_data, tiny_base_file, tiny_vae_dir, capsys
):
    def config(steps: int, resume: bool) -> FitConfig:
        return FitConfig(
            data=str(toy_data),
            base=str(tiny_base_file),
            vae=str(tiny_vae_dir),
            steps=steps,
            batch_size=4,
            save_every=2,
            sample_every=0,
            num_workers=0,
            resume=resume,
            cache_dir=str(tmp_path / "cache"),
            out=str(tmp_path / "run"),
        )

    fit(config(4, False), progress=False)
    newest = tmp_path / "run" / "checkpoints" / "step-0000004"
    (newest / "state.json").write_text('{"elapsed_s": 1.0, "step"')  # cut short by a crash
    assert fit(config(4, True), progress=False).step == 4  # already there: nothing to do, no traceback
    result = fit(config(6, True), progress=False)
    assert (result.start_step, result.step) == (2, 6)
    assert "step-0000004 is unreadable" in capsys.readouterr().err.replace("\n", "")


# -- 5. NaN samples are errors, not black images ------------------------------------------------


def test_non_finite_samples_are_refused_by_sample_and_eval(adapters, tmp_path):  # noqa: F811
    from difffit.engine.evaluation.image_sets import ModelInput, ModelSamples

    options = SamplingOptions(scheduler="ddim", steps=2, batch_size=2, device="cpu", cfg_scale=1e30)
    with pytest.raises(DiffFitError, match="Sampling produced NaN or inf values") as error:
        sample_sources([adapters[0]], 2, options, out=tmp_path / "s", progress=False)
    assert "--cfg-scale" in error.value.hint
    assert not list((tmp_path / "s").glob("*.png"))
    samples = ModelSamples.from_source(adapters[0], 2, ModelInput(options), torch.device("cpu"), progress=False)
    with pytest.raises(DiffFitError, match="Sampling produced NaN or inf values"):
        next(samples.batches(2))


def test_push_refuses_a_nan_adapter_as_sample_does(adapters, tmp_path):  # noqa: F811
    from difffit.engine.sharing.push import push_adapter

    broken = tmp_path / "run" / "adapter.safetensors"
    broken.parent.mkdir()
    corrupt_with_nan(adapters[0], broken)
    with pytest.raises(DiffFitError, match="NaN or inf") as sampled:
        load_source(str(broken))
    with pytest.raises(DiffFitError, match="NaN or inf") as pushed:
        push_adapter(broken, "me/x", dry_run_out=tmp_path / "up")
    assert pushed.value.message == sampled.value.message
    assert not (tmp_path / "up").exists()


# -- 6. messages that say what is actually wrong ------------------------------------------------


@pytest.fixture(scope="module")
def s2_adapter(tmp_path_factory) -> str:
    """An adapter of a random DiT-S/2 (6 heads, 384 wide) at 16 px in pixel space."""
    base = load_base("random:DiT-S/2", resolution=16, vae="identity")
    state = {n: p.detach().clone() for n, p in base.model.state_dict().items()}
    prepare_model(base.model, "difffit")
    meta = make_meta(base, base.model, "difffit", new_class_table=False)
    path = tmp_path_factory.mktemp("s2") / "adapter.safetensors"
    save_adapter(path, base.model, state, meta)
    return str(path)


def test_an_adapter_on_another_architecture_says_its_base_differs(s2_adapter):
    for attempt in (lambda: load_source(s2_adapter, base="tiny"), lambda: describe_source(s2_adapter, base="tiny")):
        with pytest.raises(
            DiffFitError, match="needs a DiT-S/2 base .*but tiny is a DiT-d6-w128-h4/4: the adapter's base differs"
        ) as error:
            attempt()
        assert "random:DiT-S/2" in error.value.hint


def test_info_uses_base_for_adapters_and_refuses_it_for_bases(adapters, base_file, tmp_path, monkeypatch, capsys):  # noqa: F811
    other = tmp_path / "other.safetensors"
    state = load_file(str(base_file))
    state["blocks.0.attn.proj.bias"] = state["blocks.0.attn.proj.bias"] + 1
    with safe_open(str(base_file), "pt") as reader:
        save_file(state, str(other), metadata=reader.metadata())
    same = describe_source(adapters[0], base=str(base_file))
    assert same["checked_base_matches"] is True and same["checked_base_fingerprint"] == same["base_fingerprint"]
    code, _, err = run_cli(monkeypatch, capsys, "info", adapters[0], "--base", other)
    assert code == 0 and squash(f"--base {other} is not the adapter's base") in squash(err), err
    with pytest.raises(DiffFitError, match="--base applies to adapters"):
        describe_source(str(base_file), base=str(other))


def test_long_output_names_never_show_temporary_names(adapters, tmp_path):  # noqa: F811
    out = tmp_path / ("m" * 235 + ".safetensors")  # valid (250 characters), its temporary name would not be
    merge_adapter(adapters[0], out)
    assert out.is_file() and [p.name for p in tmp_path.iterdir()] == [out.name]
    target = tmp_path / "deep" / "file.bin"
    with pytest.raises(OSError) as error, atomic_path(target) as tmp:
        open(tmp / "inside", "w")  # noqa: SIM115 - a writer failing on its temporary path
    assert error.value.filename == str(target) and ".tmp-" not in str(error.value)
    with (
        pytest.raises(DiffFitError, match=f"Could not write {target} \\(File {target} cannot") as said,
        atomic_path(target) as tmp,
    ):
        raise RuntimeError(f"File {tmp} cannot be opened.")
    assert ".tmp-" not in said.value.message


def test_a_damaged_adapter_gets_one_message_from_every_command(adapters, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    data = open(adapters[0], "rb").read()
    header = struct.unpack("<Q", data[:8])[0]
    for name, cut in [("header", 8 + header // 2), ("tensors", len(data) - 100)]:
        bad = tmp_path / f"cut-{name}.safetensors"
        bad.write_bytes(data[:cut])
        said = set()
        for args in (["info", bad], ["merge", bad, "--out", tmp_path / "m.safetensors"], ["sample", bad, *FAST]):
            code, _, err = run_cli(monkeypatch, capsys, *args)
            assert code == 1 and err.startswith("Error:"), err
            said.add(err.replace("\n", " ").split("Hint:")[0].strip())
        assert len(said) == 1 and "is damaged (truncated" in said.pop()


@pytest.mark.parametrize("content", [b"\x80\x02" + bytes(range(256)) * 8, b"GIF89a" + bytes(2000)])
def test_garbage_inception_weights_are_one_sentence(tmp_path, content):
    from difffit.engine.evaluation.inception import InceptionFeatures

    weights = tmp_path / "garbage.pth"
    weights.write_bytes(content)
    with pytest.raises(DiffFitError, match="garbage.pth is not a (readable )?PyTorch checkpoint") as error:
        InceptionFeatures(weights, torch.device("cpu"))
    assert "file an issue" not in error.value.message and "weights_only" not in error.value.message


def test_report_out_as_a_folder_gets_report_html_inside(tmp_path, monkeypatch, capsys):
    from test_report import fake_run

    run = fake_run(tmp_path / "run", [0.5, 0.4])
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "report", run, "--out", "newdir/")
    assert code == 0, err
    assert (tmp_path / "newdir" / "report.html").is_file()
    (tmp_path / "existing").mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "report", run, "-o", "existing")
    assert code == 0 and (tmp_path / "existing" / "report.html").is_file(), err


def test_fid_of_a_set_against_itself_is_never_negative():
    from difffit.engine.evaluation.statistics import Statistics, frechet_distance

    for seed in range(4):  # seeds 1-3 come out near -5e-7 without the clamp
        features = torch.rand(20, 2048, generator=torch.Generator().manual_seed(seed))
        stats = Statistics.from_features({"2048": features}, "test", keep_features=True)
        assert 0.0 <= frechet_distance(stats, stats) < 1e-5


def test_upscale_res_to_the_base_resolution_is_refused(monkeypatch, capsys, tmp_path, toy_data):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "upscale-res",
        toy_data,
        "--base",
        "tiny",
        "--to",
        "32",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--sample-every",
        "0",
    )
    assert code == 1 and "32 px is not larger than the base's 32 px" in err.replace("\n", " "), err
    assert not (tmp_path / "runs").exists()


# -- 7. integrity -------------------------------------------------------------------------------


def test_bytes_changed_in_an_adapter_are_caught_and_old_adapters_still_load(adapters, tmp_path):  # noqa: F811
    data = bytearray(open(adapters[0], "rb").read())
    data[-7] ^= 0x10  # one bit of the last tensor's data
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes(bytes(data))
    with pytest.raises(DiffFitError, match=f"{changed} is corrupt: its tensors do not match the checksum"):
        read_adapter(changed)
    with pytest.raises(DiffFitError, match="is corrupt"):
        merge_adapter(str(changed), tmp_path / "m.safetensors")
    tensors, meta = read_adapter(adapters[0])
    assert meta.checksum == tensors_checksum(tensors) and meta.checksum.startswith("crc32:")
    old = tmp_path / "old.safetensors"  # written before adapters carried a checksum
    with safe_open(adapters[0], "pt") as reader:
        raw = json.loads(reader.metadata()["difffit"])
    raw.pop("checksum")
    save_file(load_file(adapters[0]), str(old), metadata={"difffit": json.dumps(raw)})
    loaded, old_meta = read_adapter(old)
    assert old_meta.checksum is None
    assert all(np.array_equal(loaded[n].numpy(), tensors[n].numpy()) for n in tensors)
    shutil.copy(old, tmp_path / "copy.safetensors")
    assert describe_source(str(tmp_path / "copy.safetensors"))["checksum"] is None
