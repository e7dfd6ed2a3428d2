"""The methods: exact trainable sets, class rows, gamma placement and folding."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from difffit.engine.errors import DiffFitError
from difffit.engine.methods.trainable import (
    cast_frozen_matrices,
    count_groups,
    describe_method,
    fold_scale_factors,
    parse_gamma_blocks,
    prepare_model,
    trainable_parameters,
)
from difffit.engine.models.dit import DiT, config_for

XL = config_for("DiT-XL/2", input_size=32)
# DiT-XL/2 bias counts, by hand from the architecture (not from the code under test):
# patch embed 1152; per block qkv 3456 + proj 1152 + fc1 4608 + fc2 1152 + adaLN 6912; final adaLN 2304 +
# linear 2*2*8; timestep MLP 1152 + 1152.
XL_BIASES = 1152 + 28 * (3456 + 1152 + 4608 + 1152 + 6912) + 2304 + 32
XL_T_BIASES = 2 * 1152
XL_TOTAL = 675_129_632


def meta_xl():
    with torch.device("meta"):
        return DiT(XL)


def n_trainable(model) -> int:
    return sum(p.numel() for p in trainable_parameters(model).values())


def tiny(num_classes=10, seed=0):
    """A small DiT with every weight non-zero (adaLN-Zero init would hide most of the network)."""
    torch.manual_seed(seed)
    model = DiT(replace(config_for("DiT-S/2", input_size=8, num_classes=num_classes), depth=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_difffit_101_classes_is_637088():
    model = meta_xl()
    prepare_model(model, "difffit", num_classes=101)
    assert XL_BIASES == 487_328
    assert n_trainable(model) == 637_088 == XL_BIASES + 14 * 2 * 1152 + 102 * 1152
    assert count_groups(model) == {
        "biases": 487_328,
        "gamma": 32_256,
        "class_table": 102 * 1152,
        "norms": 0,
        "lora": 0,
        "adapters": 0,
        "prompts": 0,
        "other": 0,
    }
    assert model.gamma_blocks == list(range(14))
    assert not any(name.startswith("t_embedder.") for name in trainable_parameters(model))


def test_difffit_same_classes_keeps_table():
    model = meta_xl()
    table = model.y_embedder.embedding_table.weight
    prepare_model(model, "difffit", num_classes=1000)
    assert model.y_embedder.embedding_table.weight is table
    assert n_trainable(model) == XL_BIASES + 32_256 + 1001 * 1152


@pytest.mark.parametrize(
    "method, num_classes, expected",
    [
        ("bitfit", None, XL_BIASES + XL_T_BIASES),
        ("bitfit", 1000, XL_BIASES + XL_T_BIASES),
        ("bitfit", 101, XL_BIASES + XL_T_BIASES + 102 * 1152),
        ("full", None, XL_TOTAL - 256 * 1152),  # everything but pos_embed (16x16 tokens)
        ("full", 101, XL_TOTAL - 256 * 1152 - 1001 * 1152 + 102 * 1152),
    ],
)
def test_baseline_counts(method, num_classes, expected):
    model = meta_xl()
    prepare_model(model, method, num_classes=num_classes)
    assert n_trainable(model) == expected
    assert "pos_embed" not in trainable_parameters(model)
    assert model.gamma_blocks == []


def test_gamma_placement_and_counts():
    every = describe_method(XL, "difffit", gamma_blocks="all", num_classes=101)
    assert every["trainable_groups"]["gamma"] == 28 * 2304 and every["gamma_blocks"] == list(range(28))
    some = describe_method(XL, "difffit", gamma_blocks="0-1,27", num_classes=101)
    assert some["trainable_groups"]["gamma"] == 3 * 2304 and some["gamma_blocks"] == [0, 1, 27]
    assert describe_method(XL, gamma_blocks="none", num_classes=101)["trainable_params"] == 637_088 - 32_256
    adapted_total = XL_TOTAL - 1001 * 1152 + 102 * 1152 + 32_256
    percent = describe_method(XL, num_classes=101)["trainable_percent"]
    assert percent == pytest.approx(100 * 637_088 / adapted_total)


def test_parse_gamma_blocks():
    assert parse_gamma_blocks(None, 28) == list(range(14))
    assert parse_gamma_blocks("all", 12) == list(range(12))
    assert parse_gamma_blocks("none", 12) == []
    assert parse_gamma_blocks("0-2, 7,5-5", 12) == [0, 1, 2, 5, 7]
    for bad in ("12", "x", "3-1", "-1"):
        with pytest.raises(DiffFitError):
            parse_gamma_blocks(bad, 12)


def test_new_class_rows_start_as_the_null_row():
    base = tiny(num_classes=10)
    null = base.y_embedder.embedding_table.weight[10].detach().clone()
    model = copy.deepcopy(base)
    prepare_model(model, "difffit", num_classes=3)
    table = model.y_embedder.embedding_table.weight
    assert table.shape == (4, 384) and model.config.num_classes == 3 and model.y_embedder.num_classes == 3
    assert torch.equal(table, null.expand(4, -1))
    # An untrained adapter's class samples are the base's unconditional ones.
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    assert torch.equal(model(x, t, torch.tensor([0, 2])), base(x, t, torch.tensor([10, 10])))


def test_affine_norms_train_with_difffit():
    model = tiny()
    model.blocks[0].norm1 = nn.LayerNorm(384, eps=1e-6)  # a model variant with affine norms
    prepare_model(model, "difffit")
    assert {"blocks.0.norm1.weight", "blocks.0.norm1.bias"} <= set(trainable_parameters(model))
    assert count_groups(model)["norms"] == 2 * 384


def test_fold_scale_factors_matches_gamma():
    model = tiny()
    prepare_model(model, "difffit", gamma_blocks=[0, 3])
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 400, 999]), torch.tensor([0, 5, 10])
    expected = model(x, t, y)
    fold_scale_factors(model)
    assert model.gamma_blocks == [] and not any(".gamma_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(x, t, y), expected, atol=1e-5, rtol=1e-5)


def test_frozen_tensors_untouched_by_adamw_step():
    model = tiny()
    model.train()
    prepare_model(model, "difffit", num_classes=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = trainable_parameters(model)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2]))
    out.square().mean().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(model.get_parameter(n).grad is None for n in frozen)
    assert {"blocks.0.attn.qkv.weight", "t_embedder.mlp.0.bias", "pos_embed"} <= set(frozen)


@pytest.mark.parametrize("device", ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
def test_casting_frozen_matrices_keeps_autocast_outputs_bit_identical(golden, golden_model, device):
    def run(cast: bool) -> torch.Tensor:
        model = DiT(golden_model.config)
        model.load_state_dict(golden_model.state_dict())
        prepare_model(model, "difffit")
        if cast:
            assert cast_frozen_matrices(model, torch.bfloat16) > 0
            assert model.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
            assert model.blocks[0].mlp.fc1.bias.dtype == torch.float32
        model.eval().to(device)
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            return model(golden["fwd.x"].to(device), golden["fwd.t"].to(device), golden["fwd.y"].to(device))

    assert torch.equal(run(cast=False), run(cast=True))
