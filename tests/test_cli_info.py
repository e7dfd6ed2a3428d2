"""`difffit info`: bases, method reports and adapters, as JSON and as tables."""

from __future__ import annotations

import json

import pytest
from test_adapter import train, write_base
from typer.testing import CliRunner

from difffit.cli import app
from difffit.engine.methods.adapter import save_adapter

# DiT-S/2 at 256 px (32x32 latents, 4 channels, 1000 classes), by hand from the architecture.
H = 384
S2_BIASES = H + 12 * (3 * H + H + 4 * H + H + 6 * H) + 2 * H + 2 * 2 * 8
S2_TOTAL = (
    (4 * 2 * 2 * H + H)  # patch embedding
    + 256 * H  # pos_embed (16x16 tokens)
    + (256 * H + H + H * H + H)  # timestep MLP
    + 1001 * H  # class table
    + 12 * (H * 3 * H + 3 * H + H * H + H + H * 4 * H + 4 * H + 4 * H * H + H + H * 6 * H + 6 * H)
    + (H * 2 * H + 2 * H + H * 2 * 2 * 8 + 2 * 2 * 8)  # final layer
)


def run_json(*args) -> dict:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_info_random_base():
    report = run_json("info", "random:DiT-S/2")
    assert report["kind"] == "base" and report["architecture"] == "DiT-S/2"
    assert report["total_params"] == S2_TOTAL
    assert (report["num_classes"], report["latent_size"], report["in_channels"]) == (1000, 32, 4)
    assert report["learn_sigma"] is True and len(report["fingerprint"]) == 16
    assert "trainable_params" not in report


@pytest.mark.parametrize(
    "args, trainable, groups",
    [
        (
            ["--method", "difffit", "--num-classes", "5"],
            S2_BIASES + 6 * 2 * H + 6 * H,
            {"biases": S2_BIASES, "gamma": 6 * 2 * H, "class_table": 6 * H, "norms": 0, "other": 0},
        ),
        (
            ["--method", "difffit", "--gamma-blocks", "all"],
            S2_BIASES + 12 * 2 * H + 1001 * H,
            {"biases": S2_BIASES, "gamma": 12 * 2 * H, "class_table": 1001 * H, "norms": 0, "other": 0},
        ),
        (
            ["--method", "bitfit"],
            S2_BIASES + 2 * H,
            {"biases": S2_BIASES + 2 * H, "gamma": 0, "class_table": 0, "norms": 0, "other": 0},
        ),
    ],
)
def test_info_method(args, trainable, groups):
    report = run_json("info", "random:DiT-S/2", *args)
    assert report["trainable_params"] == trainable and report["trainable_groups"] == groups
    assert report["trainable_percent"] == pytest.approx(100 * trainable / report["adapted_total_params"])
    assert report["total_params"] == S2_TOTAL  # the base itself is unchanged


def test_info_method_table_on_stderr():
    result = CliRunner().invoke(app, ["info", "random:DiT-S/2", "--method", "difffit", "--num-classes", "5"])
    assert result.exit_code == 0 and result.stdout == ""
    assert "What difffit trains" in result.stderr and f"{S2_BIASES:,}" in result.stderr


def test_info_adapter(tmp_path, tiny_vae_dir):
    base_spec = write_base(tmp_path / "base.safetensors", tiny_vae_dir)
    base, trained, meta = train(base_spec)
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, trained, base.model.state_dict(), meta)
    report = run_json("info", str(path))
    assert report["kind"] == "adapter" and report["method"] == "difffit" and report["base"] == base_spec
    assert report["architecture"] == report["base_architecture"] == "DiT-d4-w384-h6/2"
    assert report["steps"] == 7 and report["file_bytes"] == path.stat().st_size
    assert report["num_classes"] == 4 and report["latent_size"] == 8 and report["resolution"] == 16
    assert report["fingerprint"] == base.fingerprint and report["dtype"] == "fp16"
    # The 4-block test base: biases of 4 blocks, gamma in blocks 0-1, 4 new classes + the null row.
    biases = S2_BIASES - 8 * 15 * H
    assert report["trainable_params"] == report["stored_params"] == biases + 2 * 2 * H + 5 * H
    checked = run_json("info", str(path), "--base", base_spec)
    assert checked["checked_base_matches"] is True
    result = CliRunner().invoke(app, ["info", str(path), "--method", "bitfit"])
    assert result.exit_code != 0 and "apply to bases" in str(result.exception)


def test_non_standard_width_needs_num_heads(tmp_path):
    from safetensors.torch import save_file

    from difffit.engine.models.dit import DiT, DiTConfig

    model = DiT(
        DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    )
    path = tmp_path / "w64.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    refused = CliRunner().invoke(app, ["info", str(path)])
    assert refused.exit_code == 1 and "pass --num-heads" in str(refused.exception.message)
    report = run_json("info", str(path), "--num-heads", "4")
    assert report["architecture"] == "DiT-d2-w64-h4/2"
    assert report["total_params"] == sum(p.numel() for p in model.parameters())
