"""`difffit push` and pulling adapters from the Hub: the card, the upload folder, the upload calls, and
`hf://` adapters read from a pre-filled Hub cache. Nothing here touches the network."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_adapter import train, write_base

from difffit.engine.errors import DiffFitError
from difffit.engine.methods.adapter import read_adapter, save_adapter
from difffit.engine.methods.hub_adapters import resolve_adapter_source
from difffit.engine.sharing.card import hub_base_id, model_card
from difffit.engine.sharing.push import push_adapter
from difffit.engine.training.config import FitConfig
from difffit.engine.training.runs import training_summary
from difffit.engine.training.train import fit

SNAPSHOT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_base_file, tiny_vae_dir) -> Path:
    """A real 4-step fit of the tiny base on the toy data, with previews at steps 0, 2 and 4."""
    from conftest import make_toy_data

    root = tmp_path_factory.mktemp("share")
    data = make_toy_data(root / "data")
    config = FitConfig(
        data=str(data),
        base=str(tiny_base_file),
        vae=str(tiny_vae_dir),
        steps=4,
        batch_size=4,
        save_every=0,
        sample_every=2,
        num_workers=0,
        cache_dir=str(root / "cache"),
        out=str(root / "run"),
        lr=1e-2,
    )
    return fit(config, progress=False).out_dir


def front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


# -- the card -----------------------------------------------------------------------------------


def test_hub_base_id():
    assert hub_base_id("DiT-XL/2-256") == "facebook/DiT-XL-2-256"
    assert hub_base_id("someone/my-dit") == "someone/my-dit"
    assert hub_base_id("hf://someone/my-dit") == "someone/my-dit"
    assert hub_base_id("someone/my-dit/transformer") is None  # more than one "/": a local path
    assert hub_base_id("random:DiT-S/2") is None and hub_base_id("tiny") is None
    assert hub_base_id(__file__) is None


def test_card_front_matter_and_body(run_dir):
    from huggingface_hub import ModelCard

    summary = training_summary(run_dir / "adapter.safetensors")
    summary["base"] = "DiT-XL/2-256"  # as if trained on the public base (MLP ratio 4, a diffusers VAE)
    summary["merge_formats"] = ["original", "diffusers"]
    eval_result = {"fid": 12.3456, "kid_mean": 0.0123, "num_generated": 1000, "num_reference": 500, "cfg_scale": 1.5}
    card = model_card(summary, "me/toy-difffit", eval_result=eval_result, grid="grid.png", grid_caption="Preview.")
    meta, body = front_matter(str(card))
    assert meta == {
        "base_model": "facebook/DiT-XL-2-256",
        "base_model_relation": "adapter",
        "library_name": "difffit",
        "license": "cc-by-nc-4.0",
        "pipeline_tag": "unconditional-image-generation",
        "tags": ["difffit", "dit", "diffusion"],
    }
    assert ModelCard(str(card)).data.base_model == "facebook/DiT-XL-2-256"  # the Hub's own parser agrees
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    for text in (
        "# toy-difffit",
        "![Samples](grid.png)",
        "0. blue",
        "1. red",
        "| Method | difffit |",
        f"| Trainable parameters | {summary['trainable_params']:,} (",
        "| Steps | 4 |",
        "| Batch size | 4 |",
        "| Learning rate | 0.01 |",
        "| Training images | 12 |",
        f"| Final loss | {records[-1]['loss']:.4f} |",
        "| FID | 12.35 |",
        "| KID | 0.0123 |",
        "| cfg_scale | 1.5 |",
        "| num_generated | 1000 |",
        "difffit sample hf://me/toy-difffit -n 16 --class blue",
        "difffit merge hf://me/toy-difffit --format diffusers --out toy-difffit-pipeline",
        'DiTPipeline.from_pretrained("toy-difffit-pipeline")',
    ):
        assert text in body, text
    assert "\n\n\n" not in body


def test_card_of_a_local_base_without_eval_or_grid(run_dir):
    summary = training_summary(run_dir / "adapter.safetensors")
    meta, body = front_matter(str(model_card(summary, "me/x", license="mit")))
    assert "base_model" not in meta and "base_model_relation" not in meta and meta["license"] == "mit"
    assert "## Evaluation" not in body and "![Samples]" not in body
    # A public card never shows the author's file system: the base and the VAE by name, the base's fingerprint.
    base, vae = Path(summary["base"]), Path(summary["vae"])
    assert base.is_absolute() and vae.is_absolute() and str(base.parent) not in body and str(vae) not in body
    assert f"`{base.name}` (a local base) (fingerprint `{summary['base_fingerprint']}`)" in body
    assert f"| VAE | `{vae.name}` (local) |" in body
    # ... and only commands that work: the local base passed by hand, and no DiTPipeline for an MLP ratio of 1.
    assert f"difffit sample hf://me/x --base {base.name} -n 16" in body
    assert summary["merge_formats"] == ["original"] and "--format diffusers" not in body
    assert f"difffit merge hf://me/x --base {base.name} --out x.safetensors" in body


@pytest.mark.parametrize(
    "method, vae, shown",
    [
        ("difffit", "stabilityai/sd-vae-ft-ema", "--format diffusers"),  # every merge works
        ("difffit", "identity", "difffit merge hf://me/x --out x.safetensors"),  # no pipeline without an AutoencoderKL
        ("adapter-parallel", "stabilityai/sd-vae-ft-ema", "not merged into its base"),  # nothing folds
    ],
)
def test_card_gives_only_merge_instructions_that_work(run_dir, method, vae, shown):
    from difffit.engine.methods.adapter import read_adapter_meta
    from difffit.engine.methods.merge import merge_formats
    from difffit.engine.models.dit import config_for

    xl = config_for("DiT-XL/2", input_size=32).to_dict()
    meta = dataclasses.replace(
        read_adapter_meta(run_dir / "adapter.safetensors"),
        method=method,
        vae_spec=vae,
        config=xl,
        base_config=xl,
        base_spec="DiT-XL/2-256",
    )
    summary = training_summary(run_dir / "adapter.safetensors") | {
        "method": method,
        "vae": vae,
        "base": meta.base_spec,
        "merge_formats": merge_formats(meta),
    }
    _, body = front_matter(str(model_card(summary, "me/x")))
    assert shown in body
    if method == "adapter-parallel":
        assert "difffit merge" not in body
    if vae == "identity":
        assert "--format diffusers" not in body and "DiTPipeline" not in body


# -- push -----------------------------------------------------------------------------------------


def test_dry_run_writes_exactly_the_upload_folder(run_dir, tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"fid": 7.5, "num_generated": 64, "num_reference": 12}))
    out = tmp_path / "upload"
    result = push_adapter(run_dir / "adapter.safetensors", "me/toy", eval_json=tmp_path / "eval.json", dry_run_out=out)
    assert result["files"] == ["README.md", "adapter.safetensors", "grid.png"] and result["dry_run"]
    assert sorted(p.name for p in out.iterdir()) == result["files"]
    assert (out / "adapter.safetensors").read_bytes() == (run_dir / "adapter.safetensors").read_bytes()
    assert (out / "grid.png").read_bytes() == (run_dir / "samples" / "step-0000004.png").read_bytes()
    _, body = front_matter((out / "README.md").read_text())
    assert "| FID | 7.5 |" in body and "step 4." in body
    with pytest.raises(DiffFitError, match="not an empty folder"):
        push_adapter(run_dir / "adapter.safetensors", "me/toy", dry_run_out=out)
    assert (out / "README.md").exists()  # the refused run removed nothing


def test_dry_run_samples_a_grid_for_named_classes(run_dir, tmp_path):
    result = push_adapter(
        run_dir / "adapter.safetensors", "me/toy", grid_classes=["red", "0"], dry_run_out=tmp_path / "up"
    )
    grid = np.asarray(Image.open(tmp_path / "up" / "grid.png"))
    assert grid.shape == (3 * 16, 3 * 16, 3)  # 8 samples of 16 px in a 3x3 grid
    assert "4 samples each of red, blue" in (tmp_path / "up" / "README.md").read_text()
    assert result["files"] == ["README.md", "adapter.safetensors", "grid.png"]


def test_merged_push_is_a_dit_pipeline(tmp_path, tiny_vae_dir):
    base = write_base(tmp_path / "base.safetensors", tiny_vae_dir)
    loaded, trained, meta = train(base)
    save_adapter(tmp_path / "adapter.safetensors", trained, loaded.model.state_dict(), meta)
    result = push_adapter(tmp_path / "adapter.safetensors", "me/merged", merged=True, dry_run_out=tmp_path / "up")
    assert "model_index.json" in result["files"] and "adapter.safetensors" not in result["files"]
    assert "transformer/config.json" in result["files"] and "grid.png" not in result["files"]
    assert ".difffit" not in result["files"]  # the local folder marker is not uploaded
    meta_yaml, _ = front_matter((tmp_path / "up" / "README.md").read_text())
    assert meta_yaml["library_name"] == "diffusers"


def test_upload_calls_at_the_hfapi_boundary(run_dir, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("DIFFFIT_NO_DOWNLOAD", "0")
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs.pop("folder_path"))
        calls.append(("upload_folder", sorted(p.name for p in folder.iterdir()), kwargs))
        return type("Commit", (), {"commit_url": "https://huggingface.co/me/toy/commit/abc"})()

    for name, method in (
        ("create_repo", create_repo),
        ("create_branch", create_branch),
        ("upload_folder", upload_folder),
    ):
        monkeypatch.setattr(HfApi, name, method)
    result = push_adapter(run_dir / "adapter.safetensors", "me/toy", private=True, revision="v1", message="first")
    assert calls == [
        ("create_repo", "me/toy", {"private": True, "exist_ok": True, "repo_type": "model"}),
        ("create_branch", "me/toy", {"branch": "v1", "exist_ok": True}),
        (
            "upload_folder",
            ["README.md", "adapter.safetensors", "grid.png"],
            {"repo_id": "me/toy", "revision": "v1", "commit_message": "first"},
        ),
    ]
    assert result["url"].endswith("/commit/abc") and not result["dry_run"]


def test_push_refusals(run_dir, tmp_path):
    adapter = run_dir / "adapter.safetensors"
    with pytest.raises(DiffFitError, match="not a hub repo id"):
        push_adapter(adapter, "just-a-name", dry_run_out=tmp_path / "a")
    with pytest.raises(DiffFitError, match="needs the network"):  # the test session is offline
        push_adapter(adapter, "me/toy")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(DiffFitError, match="holds no metric"):
        push_adapter(adapter, "me/toy", eval_json=tmp_path / "bad.json", dry_run_out=tmp_path / "b")
    with pytest.raises(DiffFitError, match="does not exist"):
        push_adapter(tmp_path / "missing.safetensors", "me/toy", dry_run_out=tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- pull -----------------------------------------------------------------------------------------


def cached_repo(repo_id: str, files: dict[str, Path | str]) -> Path:
    """A repo in the Hub cache under $HF_HOME laid out as huggingface_hub writes it (refs/main names a
    snapshot whose files link into blobs/), the way a finished download leaves it."""
    import os

    repo = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SNAPSHOT
    for name, source in files.items():
        blob = repo / "blobs" / f"blob-{name.replace('/', '-')}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, Path):
            shutil.copyfile(source, blob)
        else:
            blob.write_text(source)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(os.path.relpath(blob, (snapshot / name).parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf"


def test_pull_adapter_repo_from_the_cache(run_dir, hf_home):
    adapter = run_dir / "adapter.safetensors"
    cached_repo("me/toy", {"adapter.safetensors": adapter, "README.md": "card", "grid.png": "png"})
    for spec in ("hf://me/toy", "me/toy", "hf://me/toy/adapter.safetensors"):
        path = resolve_adapter_source(spec)
        assert path is not None and str(hf_home / "hub") in path, spec
        assert read_adapter(path)[1].to_dict() == read_adapter(adapter)[1].to_dict()


def test_commands_take_a_hub_adapter(run_dir, hf_home, tmp_path, monkeypatch, capsys):
    """sample, merge and info read hf://OWNER/NAME from the Hub cache (offline), as a local adapter."""
    from conftest import run_cli

    cached_repo("me/toy", {"adapter.safetensors": run_dir / "adapter.safetensors", "README.md": "card"})
    code, out, err = run_cli(monkeypatch, capsys, "info", "hf://me/toy", "--json")
    assert code == 0, err
    assert json.loads(out)["kind"] == "adapter" and str(hf_home / "hub") in json.loads(out)["path"]
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "sample",
        "hf://me/toy",
        "-n",
        "2",
        "--scheduler",
        "ddim",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--out",
        tmp_path / "s",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["outputs"][0]["source"] == "hf://me/toy" and (tmp_path / "s" / "000001.png").is_file()
    code, out, err = run_cli(monkeypatch, capsys, "merge", "hf://me/toy", "--out", tmp_path / "m.safetensors")
    assert code == 0, err
    assert (tmp_path / "m.safetensors").is_file()


def test_pull_tells_base_repos_and_local_paths_apart(run_dir, hf_home):
    cached_repo("facebook/DiT-XL-2-256", {"model_index.json": "{}", "transformer/config.json": "{}"})
    assert resolve_adapter_source("facebook/DiT-XL-2-256") is None
    assert resolve_adapter_source("DiT-XL/2-256") is None
    assert resolve_adapter_source("facebook/DiT-XL-2-256/vae") is None
    assert resolve_adapter_source(str(run_dir / "adapter.safetensors")) is None
    assert resolve_adapter_source("random:DiT-S/2") is None
    assert resolve_adapter_source("someone/not-cached") is None  # left to the base loader's message
    with pytest.raises(DiffFitError, match="is a base model repo"):
        resolve_adapter_source("hf://facebook/DiT-XL-2-256")


def test_pull_offline_failures_are_one_sentence(run_dir, hf_home):
    with pytest.raises(DiffFitError, match="not in the Hugging Face cache .*downloads are off"):
        resolve_adapter_source("hf://me/absent")
    cached_repo("me/toy", {"README.md": "card"})
    with pytest.raises(
        DiffFitError, match="adapter.safetensors of the hub repo me/toy is not in the Hugging Face cache"
    ) as error:
        resolve_adapter_source("hf://me/toy/adapter.safetensors")
    assert "hf download me/toy adapter.safetensors" in error.value.hint
    with pytest.raises(DiffFitError, match="no .safetensors file"):
        resolve_adapter_source("hf://me/toy")
    cached_repo(
        "me/two", {"a.safetensors": run_dir / "adapter.safetensors", "b.safetensors": run_dir / "adapter.safetensors"}
    )
    with pytest.raises(DiffFitError, match="a.safetensors, b.safetensors"):
        resolve_adapter_source("hf://me/two")
    assert resolve_adapter_source("hf://me/two/b.safetensors")
    assert resolve_adapter_source("me/two") is None  # bare: only push's adapter.safetensors marks an adapter repo
    cached_repo("me/one", {"food.safetensors": run_dir / "adapter.safetensors"})
    assert resolve_adapter_source("hf://me/one").endswith("food.safetensors")
    cached_repo("me/other", {"weights.safetensors": run_dir / "checkpoints" / "step-0000004" / "trained.safetensors"})
    with pytest.raises(DiffFitError, match="not a difffit adapter"):
        resolve_adapter_source("hf://me/other")
    with pytest.raises(DiffFitError, match="does not name a hub repo") as error:
        resolve_adapter_source("hf://not a repo")
    assert "hf://OWNER/NAME" in error.value.hint


def test_pull_lists_the_repo_on_the_hub_when_online(run_dir, hf_home, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("DIFFFIT_NO_DOWNLOAD", "0")
    downloads = []

    def hf_hub_download(repo_id, filename, **kwargs):
        downloads.append((repo_id, filename, kwargs["local_files_only"]))
        return str(run_dir / "adapter.safetensors")

    monkeypatch.setattr(HfApi, "list_repo_files", lambda self, repo_id: ["README.md", "adapter.safetensors"])
    monkeypatch.setattr("huggingface_hub.hf_hub_download", hf_hub_download)
    assert resolve_adapter_source("me/online") == str(run_dir / "adapter.safetensors")
    assert downloads == [("me/online", "adapter.safetensors", False)]


def test_upload_failures_are_one_sentence(run_dir, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("DIFFFIT_NO_DOWNLOAD", "0")

    def no_network(self, repo_id, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "create_repo", no_network)
    with pytest.raises(
        DiffFitError, match=r"Uploading to me/toy failed \(\[Errno -2\] Name or service not known\)"
    ) as error:
        push_adapter(run_dir / "adapter.safetensors", "me/toy")
    assert "network" in error.value.hint
