"""Every --base spec form loads to the reference numerics; bad inputs give one clear sentence."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import MODEL_ATOL, guidance_atol
from safetensors.torch import save_file

from difffit.engine.errors import DiffFitError
from difffit.engine.models import bases
from difffit.engine.models.bases import Base, describe_base, state_dict_fingerprint
from difffit.engine.models.diffusers_layout import diffusers_to_original, original_to_diffusers
from difffit.engine.models.dit import DIT_CONFIGS, DiT, DiTConfig, config_for
from difffit.engine.models.families import load_base
from difffit.engine.models.formats import config_from_state_dict

HEADS = 4  # the golden model's width (64) is not a standard one, so its head count must be given
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


class NotATensor:
    """Pickled by reference: a weights-only load must refuse it."""


def assert_reference_outputs(model: DiT, golden: dict) -> None:
    with torch.no_grad():
        out = model(golden["fwd.x"], golden["fwd.t"], golden["fwd.y"])
        scale = float(golden["cfg.scale"])
        cfg = model.forward_with_cfg(golden["cfg.x"], golden["cfg.t"], golden["cfg.y"], scale)
    torch.testing.assert_close(out, golden["fwd.out"], atol=MODEL_ATOL, rtol=0)
    torch.testing.assert_close(cfg, golden["cfg.out"], atol=guidance_atol(scale), rtol=0)


@pytest.fixture(scope="session")
def golden_pt(golden, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("original") / "bare.pt"
    torch.save(golden["state"], path)
    return path


@pytest.fixture(scope="session")
def diffusers_state(golden) -> tuple[dict, dict]:
    return original_to_diffusers(golden["state"], DiTConfig(**golden["config"]))


def save_transformer(folder: Path, diffusers_state: tuple[dict, dict]) -> None:
    from diffusers import DiTTransformer2DModel

    state, kwargs = diffusers_state
    transformer = DiTTransformer2DModel(**kwargs)
    transformer.load_state_dict(state, strict=True)  # the export must match diffusers' keys exactly
    transformer.save_pretrained(folder)


def make_pipeline(folder: Path, diffusers_state, vae_dir: Path, class_names: list[str]) -> Path:
    """A diffusers DiTPipeline folder laid out as the hub's facebook/DiT-XL-2-256 is."""
    from diffusers import DDIMScheduler

    save_transformer(folder / "transformer", diffusers_state)
    shutil.copytree(vae_dir, folder / "vae")
    DDIMScheduler().save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "DiTPipeline",
        "id2label": {str(i): name for i, name in enumerate(class_names)},
        "scheduler": ["diffusers", "DDIMScheduler"],
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


# -- original layout ---------------------------------------------------------------------------


def test_bare_pt_matches_reference(golden, golden_pt):
    base = load_base(str(golden_pt), num_heads=HEADS)
    assert base.source_format == "original"
    assert base.config == DiTConfig(**golden["config"])
    assert not base.model.training
    assert_reference_outputs(base.model, golden)


def test_training_checkpoint_prefers_ema(golden, golden_pt, tmp_path):
    decoy = {k: torch.zeros_like(v) for k, v in golden["state"].items()}
    checkpoint = {
        "model": decoy,
        "ema": golden["state"],
        "opt": {"step": 3},
        "args": argparse.Namespace(model="DiT-XL/2", image_size=256),
    }
    torch.save(checkpoint, tmp_path / "0050000.pt")
    base = load_base(str(tmp_path / "0050000.pt"), num_heads=HEADS)
    assert_reference_outputs(base.model, golden)
    assert base.fingerprint == load_base(str(golden_pt), num_heads=HEADS).fingerprint

    torch.save({"model": golden["state"], "args": argparse.Namespace(lr=1e-4)}, tmp_path / "model_only.pth")
    assert_reference_outputs(load_base(str(tmp_path / "model_only.pth"), num_heads=HEADS).model, golden)


def test_ddp_prefix_is_stripped(golden, tmp_path):
    torch.save({f"module.{k}": v for k, v in golden["state"].items()}, tmp_path / "ddp.pt")
    assert_reference_outputs(load_base(str(tmp_path / "ddp.pt"), num_heads=HEADS).model, golden)


def test_safetensors_with_difffit_metadata(golden, golden_pt, tmp_path):
    path = tmp_path / "merged.safetensors"
    names = [f"class {i}" for i in range(10)]
    metadata = {"difffit.class_names": json.dumps(names), "difffit.vae": "identity", "difffit.pos_embed_scale": "1.0"}
    save_file({k: v.contiguous() for k, v in golden["state"].items()}, str(path), metadata=metadata)
    base = load_base(str(path), num_heads=HEADS)
    assert_reference_outputs(base.model, golden)
    assert base.class_names == names
    assert base.vae_spec == "identity" and base.vae_factor == 1 and base.resolution == 8
    assert base.fingerprint == load_base(str(golden_pt), num_heads=HEADS).fingerprint
    # --vae wins over the file's own.
    other_vae = "stabilityai/sd-vae-ft-mse"
    assert load_base(str(path), num_heads=HEADS, vae=other_vae).vae_spec == other_vae


def test_plain_safetensors_defaults(golden, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in golden["state"].items()}, str(path))
    base = load_base(str(path), num_heads=HEADS)
    assert base.class_names is None
    assert base.vae_spec == bases.DEFAULT_VAE and base.resolution == 64


def test_stored_pos_embed_is_used_and_its_scale_read(golden, golden_pt, tmp_path):
    """The resolution trick's positions (scale 2) come from the file, not a recomputed grid."""
    trick = DiT(DiTConfig(**{**golden["config"], "pos_embed_scale": 2.0}))
    state = {**golden["state"], "pos_embed": trick.pos_embed.detach().clone()}
    torch.save(state, tmp_path / "trick.pt")
    base = load_base(str(tmp_path / "trick.pt"), num_heads=HEADS)
    assert base.config.pos_embed_scale == 2.0
    assert torch.equal(base.model.pos_embed, state["pos_embed"])
    assert base.fingerprint != load_base(str(golden_pt), num_heads=HEADS).fingerprint
    with pytest.raises(DiffFitError, match="sin-cos positions"):
        original_to_diffusers(state, base.config)


def test_resolution_mismatch_points_to_upscale(golden_pt):
    with pytest.raises(DiffFitError, match="works at 64 px.*upscale-res"):
        load_base(str(golden_pt), resolution=512, num_heads=HEADS)
    assert load_base(str(golden_pt), resolution=64, num_heads=HEADS).resolution == 64


# -- diffusers layout --------------------------------------------------------------------------


def test_conversion_round_trip_is_exact(golden, diffusers_state):
    state, kwargs = diffusers_state
    assert kwargs["num_layers"] == 2 and kwargs["num_embeds_ada_norm"] == 10
    back = diffusers_to_original(state)
    expected = {k: v for k, v in golden["state"].items() if k != "pos_embed"}  # diffusers does not store it
    assert back.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(back[key], value), key


def test_export_runs_in_diffusers_with_reference_frequencies(golden, diffusers_state):
    """Checks the key mapping independently of its inverse: diffusers' own model on our export."""
    from diffusers import DiTTransformer2DModel

    state, kwargs = diffusers_state
    model = DiTTransformer2DModel(**kwargs).eval()
    model.load_state_dict(state, strict=True)
    args = golden["fwd.x"], golden["fwd.t"], golden["fwd.y"]
    with torch.no_grad():
        stock = model(*args).sample
        for block in model.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0  # frequencies / 128, as the reference
        aligned = model(*args).sample
    assert (stock - golden["fwd.out"]).abs().max() > 1e-2  # why we never run diffusers' numerics
    torch.testing.assert_close(aligned, golden["fwd.out"], atol=MODEL_ATOL, rtol=0)


def test_diffusers_transformer_folder(golden, golden_pt, diffusers_state, tmp_path):
    save_transformer(tmp_path / "transformer", diffusers_state)
    base = load_base(str(tmp_path / "transformer"))
    assert base.source_format == "diffusers"
    assert base.config == DiTConfig(**golden["config"])
    assert_reference_outputs(base.model, golden)
    assert base.fingerprint == load_base(str(golden_pt), num_heads=HEADS).fingerprint
    assert base.vae_spec == bases.DEFAULT_VAE


def test_diffusers_pipeline_folder(golden, golden_pt, diffusers_state, tiny_vae_dir, tmp_path):
    names = [f"label {i}, alias" for i in range(10)]
    folder = make_pipeline(tmp_path / "pipe", diffusers_state, tiny_vae_dir, names)
    base = load_base(str(folder))
    assert base.source_format == "diffusers"
    assert_reference_outputs(base.model, golden)
    assert base.fingerprint == load_base(str(golden_pt), num_heads=HEADS).fingerprint
    assert base.class_names == names
    assert Path(base.vae_spec) == folder / "vae"
    assert base.vae_factor == 2 and base.resolution == 16
    assert base.vae().factor == 2  # the pipeline's own VAE, loaded on first use
    assert load_base(str(folder), vae="identity").vae_spec == "identity"


def test_differing_embedder_copies_warn(golden, diffusers_state, caplog):
    state = dict(diffusers_state[0])
    key = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    state[key] = state[key] + 1.0
    with caplog.at_level(logging.WARNING, logger="difffit"):
        converted = diffusers_to_original(state)
    assert "y_embedder.embedding_table.weight differ (blocks 1 vs block 0)" in caplog.text
    table = "y_embedder.embedding_table.weight"
    assert torch.equal(converted[table], golden["state"][table])  # block 0's copy is kept


def test_identical_embedder_copies_do_not_warn(diffusers_state, caplog):
    with caplog.at_level(logging.WARNING, logger="difffit"):
        diffusers_to_original(diffusers_state[0])
    assert caplog.text == ""


# -- hub aliases through a fake Hugging Face cache ---------------------------------------------


def fake_hub_repo(hf_home: Path, repo_id: str) -> Path:
    """The cache layout huggingface_hub resolves offline: refs/main names a snapshot folder."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return repo / "snapshots" / SNAPSHOT


def test_alias_resolves_through_the_hub_cache(golden, diffusers_state, tiny_vae_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    snapshot = fake_hub_repo(tmp_path / "hf", "facebook/DiT-XL-2-256")
    make_pipeline(snapshot, diffusers_state, tiny_vae_dir, [f"c{i}" for i in range(10)])
    base = load_base("DiT-XL/2-256")
    assert base.spec == "DiT-XL/2-256" and base.source_format == "diffusers"
    assert_reference_outputs(base.model, golden)
    assert base.class_names[3] == "c3"
    assert base.vae_spec == "facebook/DiT-XL-2-256/vae"  # portable: resolved through the cache when used
    assert base.vae_factor == 2
    assert base.vae().latent_channels == 4
    # The same repo by its hub id.
    assert load_base("facebook/DiT-XL-2-256").fingerprint == base.fingerprint


def test_missing_alias_offline_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(DiffFitError) as error:
        load_base("DiT-XL/2-512")
    message = error.value.message
    assert "hf download facebook/DiT-XL-2-512" in message
    assert str(tmp_path / "hf" / "hub") in message and "downloads are off" in message
    with pytest.raises(DiffFitError, match="hf download someone/my-dit"):
        load_base("someone/my-dit")


# -- architecture inference --------------------------------------------------------------------


@pytest.mark.parametrize("name", [f"{family}/{patch}" for family in DIT_CONFIGS for patch in (2, 4, 8)])
def test_architecture_read_off_meta_state_dict(name):
    config = config_for(name, input_size=32, num_classes=1000)
    with torch.device("meta"):
        state = DiT(config).state_dict()
    assert config_from_state_dict(state) == config
    assert config.name == name


def test_architecture_variants_and_nonstandard_width():
    config = config_for("DiT-B/4", input_size=64, num_classes=7, learn_sigma=False, in_channels=3)
    with torch.device("meta"):
        assert config_from_state_dict(DiT(config).state_dict()) == config
        odd = DiTConfig(input_size=8, hidden_size=96, depth=3, num_heads=3, num_classes=5)
        odd_state = DiT(odd).state_dict()
    with pytest.raises(DiffFitError, match="width 96.*--num-heads"):
        config_from_state_dict(odd_state)
    assert config_from_state_dict(odd_state, num_heads=3) == odd


def test_param_count_of_dit_xl2_on_meta():
    with torch.device("meta"):
        model = DiT(config_for("DiT-XL/2", input_size=32)).eval()
    base = Base(model, "random:DiT-XL/2", "random", "0" * 16, bases.DEFAULT_VAE)
    info = describe_base(base)
    assert info["total_params"] == 675_129_632
    assert info["architecture"] == "DiT-XL/2" and info["resolution"] == 256 and info["latent_size"] == 32


# -- random bases ------------------------------------------------------------------------------


def test_random_base_is_sized_seeded_and_adaln_zero():
    torch.manual_seed(123)
    first = load_base("random:DiT-S/4", resolution=64, num_classes=10)
    torch.manual_seed(456)
    second = load_base("random:DiT-S/4", resolution=64, num_classes=10)
    assert first.fingerprint == second.fingerprint
    for (key, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    config = first.config
    assert (config.name, config.input_size, config.num_classes, config.in_channels) == ("DiT-S/4", 8, 10, 4)
    assert first.source_format == "random" and first.resolution == 64
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 10])
    assert torch.count_nonzero(first.model(x, t, y)) == 0  # adaLN-Zero: the final layer starts at zero
    assert torch.count_nonzero(first.model.blocks[0].attn.qkv.weight) > 0


def test_random_base_info_and_identity_vae():
    base = load_base("random:DiT-S/8", resolution=32, vae="identity")
    info = describe_base(base)
    assert info["kind"] == "base" and info["architecture"] == "DiT-S/8"
    sizes = (info["latent_size"], info["in_channels"], info["resolution"], info["num_classes"])
    assert sizes == (32, 3, 32, 1000)
    assert info["total_params"] == sum(p.numel() for p in base.model.parameters())
    assert info["learn_sigma"] is True and info["fingerprint"] == base.fingerprint
    assert info["vae"] == "identity" and info["class_names"] is None and info["source_format"] == "random"


def test_random_base_bad_names_and_sizes():
    with pytest.raises(DiffFitError, match="Unknown random base 'random:DiT-XXL/2'.*random:DiT-S/2"):
        load_base("random:DiT-XXL/2")
    with pytest.raises(DiffFitError, match="multiple of 16"):
        load_base("random:DiT-S/2", resolution=100)


# -- the bundled tiny base ---------------------------------------------------------------------


def test_tiny_base_bundled_or_clear_error(golden, tmp_path, monkeypatch):
    monkeypatch.setattr(bases, "TINY_BASE", tmp_path / "absent")
    with pytest.raises(DiffFitError, match="tiny base is not bundled in this build"):
        load_base("tiny")
    bundle = tmp_path / "tiny"
    bundle.mkdir()
    save_file(
        {k: v.contiguous() for k, v in golden["state"].items()},
        str(bundle / "base.safetensors"),
        metadata={"difffit.vae": "identity", "difffit.num_heads": "4"},
    )
    monkeypatch.setattr(bases, "TINY_BASE", bundle)
    base = load_base("tiny")
    assert base.source_format == "bundled" and base.spec == "tiny" and base.vae_spec == "identity"
    assert_reference_outputs(base.model, golden)


# -- fingerprint -------------------------------------------------------------------------------


def test_fingerprint_sees_weights_not_gamma_or_dtype(golden):
    state = golden["state"]
    reference = state_dict_fingerprint(state)
    assert reference == state_dict_fingerprint(dict(reversed(list(state.items()))))  # key order
    assert reference == state_dict_fingerprint({**state, "blocks.0.gamma_attn": torch.ones(64)})
    half = {k: v.half() for k, v in state.items()}
    assert state_dict_fingerprint(half) == state_dict_fingerprint({k: v.float() for k, v in half.items()})
    changed = dict(state)
    weight = state["blocks.1.mlp.fc2.weight"].clone()
    weight.view(-1)[0] += 1e-3  # the first element is always sampled
    changed["blocks.1.mlp.fc2.weight"] = weight
    assert state_dict_fingerprint(changed) != reference
    renamed = {("x." + k if k.startswith("final") else k): v for k, v in state.items()}
    assert state_dict_fingerprint(renamed) != reference


# -- bad inputs: one sentence each -------------------------------------------------------------


def test_missing_file():
    with pytest.raises(DiffFitError, match=r"nowhere/model.pt does not exist \(no such file or folder\)"):
        load_base("nowhere/model.pt")


def test_text_file_named_pt(tmp_path):
    (tmp_path / "notes.pt").write_text("these are my notes, not weights\n")
    with pytest.raises(DiffFitError, match="notes.pt is not a PyTorch checkpoint"):
        load_base(str(tmp_path / "notes.pt"))


def test_truncated_files(golden, golden_pt, tmp_path):
    full = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in golden["state"].items()}, str(full))
    data = full.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DiffFitError, match=r"cut.safetensors is damaged \(truncated: .*\); copy or download it"):
        load_base(str(tmp_path / "cut.safetensors"))
    data = golden_pt.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DiffFitError, match="cut.pt is not a readable PyTorch checkpoint"):
        load_base(str(tmp_path / "cut.pt"))


def test_other_network(tmp_path):
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).state_dict(), tmp_path / "mlp.pt")
    expected = r"does not look like a DiT checkpoint: missing x_embedder.proj.weight.*its keys: 0.weight"
    with pytest.raises(DiffFitError, match=expected):
        load_base(str(tmp_path / "mlp.pt"))


def test_pickle_that_is_not_weights_only(golden, tmp_path):
    torch.save({"state": golden["state"], "extra": NotATensor()}, tmp_path / "evil.pt")
    expected = r"Refusing to unpickle .*evil.pt: it holds Python objects \(.*NotATensor\)"
    with pytest.raises(DiffFitError, match=expected):
        load_base(str(tmp_path / "evil.pt"))


def test_unknown_alias_lists_known():
    expected = "Unknown base alias 'DiT-XL/2-1024'; known aliases: DiT-XL/2-256, DiT-XL/2-512"
    with pytest.raises(DiffFitError, match=expected):
        load_base("DiT-XL/2-1024")


def test_training_state_with_gamma_is_not_a_base(golden, tmp_path):
    torch.save({**golden["state"], "blocks.0.gamma_attn": torch.ones(64)}, tmp_path / "train.pt")
    with pytest.raises(DiffFitError, match="scale factors"):
        load_base(str(tmp_path / "train.pt"), num_heads=HEADS)


def test_dit_with_missing_block_tensor(golden, tmp_path):
    state = {k: v for k, v in golden["state"].items() if k != "blocks.1.attn.proj.bias"}
    torch.save(state, tmp_path / "partial.pt")
    expected = "does not match the .* it looks like: missing blocks.1.attn.proj.bias"
    with pytest.raises(DiffFitError, match=expected):
        load_base(str(tmp_path / "partial.pt"), num_heads=HEADS)


def test_folder_that_is_no_model(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DiffFitError, match="neither a diffusers pipeline"):
        load_base(str(tmp_path))
