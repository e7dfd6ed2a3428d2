"""The adapter file: exact round trips, base checks, corrupt files, swapping, size."""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from difffit.engine.errors import DiffFitError
from difffit.engine.methods.adapter import (
    AdapterMeta,
    AdapterSwapper,
    expected_shapes,
    is_adapter_file,
    make_meta,
    read_adapter,
    save_adapter,
)
from difffit.engine.methods.sources import load_source
from difffit.engine.methods.trainable import prepare_model, trainable_parameters
from difffit.engine.models.dit import DiT, config_for
from difffit.engine.models.families import load_base

X = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
T = torch.tensor([1, 400, 999])


def write_base(path, vae_dir, seed=0, num_classes=10):
    """A 4-block DiT-S/2 base file (8x8 latents, 16 px with the tiny VAE) with every weight non-zero."""
    torch.manual_seed(seed)
    model = DiT(replace(config_for("DiT-S/2", input_size=8, num_classes=num_classes), depth=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn_like(p) * 0.02)
    names = json.dumps([f"c{i}" for i in range(num_classes)])
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path),
        metadata={"difffit.vae": str(vae_dir), "difffit.class_names": names},
    )
    return str(path)


@pytest.fixture(scope="module")
def base_spec(tmp_path_factory, tiny_vae_dir):
    return write_base(tmp_path_factory.mktemp("base") / "base.safetensors", tiny_vae_dir)


@pytest.fixture(scope="module")
def other_base_spec(tmp_path_factory, tiny_vae_dir):
    return write_base(tmp_path_factory.mktemp("other") / "other.safetensors", tiny_vae_dir, seed=1)


def train(base_spec, method="difffit", num_classes=4, scale=0.05, seed=0, **prepare):
    """What a training run ends with: the base, its adapted model with perturbed trainable tensors, meta."""
    base = load_base(base_spec)
    model = copy.deepcopy(base.model)
    prepare_model(model, method, num_classes=num_classes, **prepare)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * scale)
    new = model.config.num_classes != base.config.num_classes
    names = [f"class{i}" for i in range(model.config.num_classes)] if new else base.class_names
    meta = make_meta(
        base,
        model.eval(),
        method,
        new_class_table=new,
        class_names=names,
        training={"steps": 7, "batch_size": 2, "lr": 1e-3, "seed": 0, "last_loss": 0.5},
    )
    return base, model, meta


def outputs(model, num_classes):
    y = torch.tensor([0, num_classes - 1, num_classes])  # two classes and the null label
    with torch.no_grad():
        return model(X, T, y)


def test_untrained_adapter_reproduces_base_bit_for_bit(base_spec, tmp_path):
    base = load_base(base_spec)
    model = copy.deepcopy(base.model)
    prepare_model(model, "difffit", gamma_blocks=list(range(4)))  # same classes: base table kept
    meta = make_meta(base, model, "difffit", new_class_table=False, class_names=base.class_names)
    for dtype in ("fp16", "fp32"):
        save_adapter(tmp_path / f"a-{dtype}.safetensors", model, base.model.state_dict(), meta, dtype=dtype)
        loaded, _ = load_source(str(tmp_path / f"a-{dtype}.safetensors"))
        assert torch.equal(outputs(loaded.model, 10), outputs(base.model, 10))
        for name, value in base.model.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[name], value), name
        assert loaded.model.gamma_blocks == list(range(4))


@pytest.mark.parametrize("method", ["difffit", "bitfit", "full"])
def test_trained_adapter_reproduces_trained_model(base_spec, tmp_path, method):
    base, trained, meta = train(base_spec, method)
    expected = outputs(trained, 4)
    base_state = base.model.state_dict()
    save_adapter(tmp_path / "fp32.safetensors", trained, base_state, meta, dtype="fp32")
    exact, got_meta = load_source(str(tmp_path / "fp32.safetensors"))
    assert torch.equal(outputs(exact.model, 4), expected)
    assert got_meta.method == method and exact.class_names == [f"class{i}" for i in range(4)]
    assert exact.config.num_classes == 4 and exact.model.y_embedder.embedding_table.weight.shape[0] == 5

    save_adapter(tmp_path / "fp16.safetensors", trained, base_state, meta)
    approx, _ = load_source(str(tmp_path / "fp16.safetensors"))
    trained_state, approx_state = trained.state_dict(), approx.model.state_dict()
    for name in trainable_parameters(trained):
        if name.endswith("embedding_table.weight"):  # a new table is stored as values
            change = trained_state[name].abs()
        else:
            change = (trained_state[name] - base_state.get(name, torch.ones(1))).abs()
        # fp16 keeps 11 significant bits of the *change*, not of the weight.
        assert ((approx_state[name] - trained_state[name]).abs() <= change * 2**-11 + 1e-7).all(), name
    # ... which moves outputs far less than the training did (full fine-tuning changes 33M weights).
    moved = (expected - outputs(base.model, 4)).abs().max()
    assert (outputs(approx.model, 4) - expected).abs().max() < 0.01 * moved


def test_adapter_metadata(base_spec, tmp_path):
    base, trained, meta = train(base_spec)
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, trained, base.model.state_dict(), meta)
    tensors, got = read_adapter(path)
    assert is_adapter_file(path) and not is_adapter_file(base_spec)
    stored = got.to_dict()
    assert stored["format"] == "difffit-adapter" and stored["version"] == 1
    assert stored["base_spec"] == base_spec and stored["base_fingerprint"] == base.fingerprint
    assert stored["architecture"] == "DiT-d4-w384-h6/2" and stored["latent_size"] == 8 and stored["resolution"] == 16
    assert stored["num_classes"] == 4 and stored["null_index"] == 4 and stored["pos_embed"] == "standard"
    assert stored["gamma_blocks"] == [0, 1] and stored["training"]["steps"] == 7
    assert stored["vae_spec"] == base.vae_spec and stored["dtype"] == "fp16" and stored["storage"] == "delta"
    assert set(tensors) == set(trainable_parameters(trained))
    assert all(t.dtype == torch.float16 for t in tensors.values())
    gamma = trained.blocks[0].gamma_attn.detach()
    assert torch.equal(tensors["blocks.0.gamma_attn"], (gamma - 1).half())  # gamma is stored as gamma - 1


def test_other_base_is_refused_unless_forced(base_spec, other_base_spec, tmp_path):
    base, trained, meta = train(base_spec)
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, trained, base.model.state_dict(), meta, dtype="fp32")
    with pytest.raises(DiffFitError) as info:
        load_source(str(path), base=other_base_spec)
    assert base_spec in info.value.message and base.fingerprint in info.value.message
    forced, _ = load_source(str(path), base=other_base_spec, force_base=True)
    other, got = load_base(other_base_spec).model.state_dict(), forced.model.state_dict()
    assert torch.equal(got["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])
    assert torch.equal(got["blocks.0.attn.qkv.bias"], trained.state_dict()["blocks.0.attn.qkv.bias"])


def test_swapper_applies_and_restores(base_spec, tmp_path):
    base = load_base(base_spec)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    reference = outputs(base.model, 10)
    swapper = AdapterSwapper(base)
    for seed, method in ((0, "difffit"), (1, "bitfit")):
        _, trained, meta = train(base_spec, method, seed=seed)
        save_adapter(tmp_path / f"{seed}.safetensors", trained, before, meta, dtype="fp32")
        swapper.apply(*read_adapter(tmp_path / f"{seed}.safetensors"))
        assert torch.equal(outputs(base.model, 4), outputs(trained, 4))
    swapper.restore()
    assert base.model.gamma_blocks == [] and base.config.num_classes == 10
    assert base.model.state_dict().keys() == before.keys()
    assert all(torch.equal(base.model.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(outputs(base.model, 10), reference)


# ---------------------------------------------------------------------------------------------
# Corrupt and foreign files
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def adapter_file(base_spec, tmp_path):
    base, trained, meta = train(base_spec)
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, trained, base.model.state_dict(), meta)
    return path


def rewrite(path, out, *, meta_edit=None, tensors_edit=None):
    tensors = load_file(str(path))
    header_size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    metadata = json.loads(path.read_bytes()[8 : 8 + header_size])["__metadata__"]
    raw = json.loads(metadata["difffit"])
    if meta_edit:
        meta_edit(raw)
    if tensors_edit:
        tensors_edit(tensors)
    save_file(tensors, str(out), metadata={"difffit": json.dumps(raw)})
    return out


@pytest.mark.parametrize(
    "damage, words",
    [
        ("truncated", "damaged"),
        ("garbage", "not a safetensors file"),
        ("version", "format version 2"),
        ("format", "not a difffit adapter"),
        ("missing", "missing blocks.0.attn.proj.bias"),
        ("unexpected", "unexpected blocks.3.gamma_mlp"),
        ("shape", "has shape"),
        ("plain safetensors", "not a difffit adapter"),
    ],
)
def test_corrupt_adapters_are_refused(adapter_file, tmp_path, damage, words):
    bad = tmp_path / "bad.safetensors"
    data = adapter_file.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) - 1000])
    elif damage == "garbage":
        bad.write_bytes(b"this is not a safetensors file\n" * 10)
    elif damage == "version":
        rewrite(adapter_file, bad, meta_edit=lambda m: m.update(version=2))
    elif damage == "format":
        rewrite(adapter_file, bad, meta_edit=lambda m: m.update(format="something-else"))
    elif damage == "missing":
        rewrite(adapter_file, bad, tensors_edit=lambda t: t.pop("blocks.0.attn.proj.bias"))
    elif damage == "unexpected":
        rewrite(adapter_file, bad, tensors_edit=lambda t: t.update({"blocks.3.gamma_mlp": torch.ones(384)}))
    elif damage == "shape":
        wrong = {"blocks.0.attn.proj.bias": torch.ones(2)}
        rewrite(adapter_file, bad, tensors_edit=lambda t: t.update(wrong))
    else:
        save_file({"w": torch.zeros(2)}, str(bad))
    with pytest.raises(DiffFitError) as info:
        read_adapter(bad)
    message = info.value.message
    assert words in message and "\n" not in message and message.endswith(".")


def test_cli_refuses_truncated_adapter_cleanly(adapter_file, tmp_path):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(adapter_file.read_bytes()[:-500])
    for args in (["info", str(bad)], ["merge", str(bad), "--out", str(tmp_path / "m.safetensors")]):
        result = subprocess.run(
            [sys.executable, "-m", "difffit", *args],
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": "1000"},
        )
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:") and "damaged" in lines[0], result.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_xl_adapter_for_101_classes_is_under_2mb():
    """The real file format, with DiT-XL/2's shapes (computed on the meta device; no 2.7 GB model)."""
    xl = config_for("DiT-XL/2", input_size=32)
    meta = AdapterMeta(
        method="difffit",
        gamma_blocks=list(range(14)),
        base_spec="DiT-XL/2-256",
        base_fingerprint="0" * 16,
        base_config=xl.to_dict(),
        config={**xl.to_dict(), "num_classes": 101},
        vae_spec="stabilityai/sd-vae-ft-ema",
        new_class_table=True,
        class_names=[f"food class {i}" for i in range(101)],
    )
    shapes = expected_shapes(meta)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 637_088
    data = save(
        {name: torch.zeros(shape, dtype=torch.float16) for name, shape in shapes.items()},
        metadata={"difffit": json.dumps(meta.to_dict())},
    )
    assert len(data) < 2 * 1024 * 1024
