"""The paper's baselines (LoRA on peft, bottleneck adapters, VPT-deep) and DiffFit's branch+attn gamma:
untrained = base, counts, adapter files, swapping across methods, merge, peft export, training."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from test_adapter import T, X, outputs, write_base
from test_methods import meta_xl, n_trainable, tiny
from test_train import adapter_tensors
from torch import nn

from difffit.engine.errors import DiffFitError
from difffit.engine.methods.adapter import AdapterSwapper, make_meta, read_adapter, save_adapter
from difffit.engine.methods.baselines import MethodSettings
from difffit.engine.methods.lora_targets import parse_lora_targets
from difffit.engine.methods.merge import merge_adapter
from difffit.engine.methods.sources import load_source
from difffit.engine.methods.trainable import (
    FOLDABLE,
    METHODS,
    count_groups,
    describe_method,
    fold_scale_factors,
    prepare_model,
    trainable_parameters,
)
from difffit.engine.models.families import load_base
from difffit.engine.training.config import FitConfig
from difffit.engine.training.train import fit

ADDING = ("lora", "adapter-parallel", "adapter-sequential", "vpt-deep")
# Small settings for the 384-wide test models (the defaults are sized for DiT-XL/2).
SMALL = MethodSettings(rank=4, adapter_dim=8, prompt_tokens=3)
# Every variant the tests cover: (method, settings).
VARIANTS = [(m, SMALL) for m in METHODS] + [
    ("difffit", MethodSettings(gamma_placement="branch+attn")),
    ("lora", MethodSettings(rank=2, lora_alpha=6, lora_targets=("fc1", "fc2", "adaLN"))),
]
IDS = [m for m in METHODS] + ["difffit-branch+attn", "lora-mlp-adaLN"]


def y(num_classes):
    return torch.tensor([0, num_classes - 1, num_classes])


# ---------------------------------------------------------------------------------------------
# Untrained = base (VPT: its documented properties instead)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, settings", [v for v in VARIANTS if v[0] != "vpt-deep"], ids=[i for i in IDS if i != "vpt-deep"]
)
def test_untrained_method_reproduces_the_base_bit_for_bit(method, settings):
    base = tiny()
    model = copy.deepcopy(base)
    prepare_model(model, method, num_classes=10, settings=settings)  # same classes: the base's table
    assert trainable_parameters(model)
    with torch.no_grad():
        assert torch.equal(model(X, T, y(10)), base(X, T, y(10)))


def test_vpt_deep_properties():
    """Prompts change attention from the first step, so an untrained VPT is not the base. What holds:
    0 tokens is the base exactly; every block returns only the image tokens (the final layer never sees
    a prompt); prompts enter without the positional embedding; they receive gradients."""
    base = tiny()
    none = copy.deepcopy(base)
    prepare_model(none, "vpt-deep", settings=MethodSettings(prompt_tokens=0))
    with torch.no_grad():
        assert torch.equal(none(X, T, y(10)), base(X, T, y(10)))

    model = copy.deepcopy(base)
    prepare_model(model, "vpt-deep", settings=SMALL)
    seen = {}

    def keep(name, take):
        return lambda module, inputs, output: seen.update({name: take(inputs, output)})  # returns None

    model.blocks[1].norm1.register_forward_hook(keep("block1_in", lambda i, o: i[0]))
    model.blocks[1].register_forward_hook(keep("block1_out", lambda i, o: o))
    model.final_layer.register_forward_hook(keep("final_in", lambda i, o: i[0]))
    out = model(X, T, y(10))
    tokens = (8 // 2) ** 2
    assert seen["block1_in"].shape == (3, tokens + 3, 384)  # this block's 3 prompts, then the image tokens
    assert torch.equal(seen["block1_in"][:, :3], model.blocks[1].prompts.expand(3, -1, -1))  # no pos_embed
    assert seen["block1_out"].shape == seen["final_in"].shape == (3, tokens, 384)
    assert out.shape == base(X, T, y(10)).shape and not torch.equal(out, base(X, T, y(10)))
    out.square().mean().backward()
    assert all(b.prompts.grad is not None and b.prompts.grad.abs().sum() > 0 for b in model.blocks)


# ---------------------------------------------------------------------------------------------
# Counts (info) against the architecture and the paper
# ---------------------------------------------------------------------------------------------

# DiT-XL/2, 101 classes, by hand: the new table 102 x 1152; per block qkv 1152 -> 3456, proj 1152 -> 1152.
TABLE = 102 * 1152


@pytest.mark.parametrize(
    "method, settings, group, expected, paper",
    [
        ("lora", MethodSettings(), "lora", 28 * 8 * ((1152 + 3456) + (1152 + 1152)), 1.15e6),
        ("lora", MethodSettings(lora_targets=("qkv",)), "lora", 28 * 8 * (1152 + 3456), 1.15e6),
        ("lora", MethodSettings(rank=16, lora_targets=("qkv",)), "lora", 28 * 16 * (1152 + 3456), 2.18e6),
        ("adapter-parallel", MethodSettings(), "adapters", 28 * (1152 * 64 + 64 + 64 * 1152 + 1152), 4.28e6),
        ("adapter-sequential", MethodSettings(), "adapters", 28 * (1152 * 64 + 64 + 64 * 1152 + 1152), 4.28e6),
        ("vpt-deep", MethodSettings(prompt_tokens=10), "prompts", 28 * 10 * 1152, 2.81e6),
        ("difffit", MethodSettings(gamma_placement="branch+attn"), "gamma", 14 * (1152 + 1152 + 3456 + 1152), 0.83e6),
    ],
)
def test_trainable_counts_on_dit_xl(method, settings, group, expected, paper):
    report = describe_method(meta_xl().config, method, num_classes=101, settings=settings)
    groups = report["trainable_groups"]
    assert groups[group] == expected and groups["class_table"] == TABLE
    if method != "difffit":
        assert report["trainable_params"] == expected + TABLE
    assert report["paper_trainable_params"] == paper
    assert report["settings"] == settings.for_method(method)


def test_paper_counts_match_ours_where_the_setting_is_known():
    """The Table 1 numbers we can rebuild from the architecture agree to the paper's rounding."""
    xl = meta_xl().config
    for method, settings in (
        ("full", None),
        ("bitfit", None),
        ("adapter-parallel", None),
        ("lora", MethodSettings(lora_targets=("qkv",))),
        ("lora", MethodSettings(rank=16, lora_targets=("qkv",))),
    ):
        report = describe_method(xl, method, num_classes=101, settings=settings)
        assert round(report["trainable_params"] / 1e4) == round(report["paper_trainable_params"] / 1e4), method


def test_untouched_base_weights_are_frozen_for_the_adding_methods():
    for method in ADDING:
        model = meta_xl()
        prepare_model(model, method, num_classes=1000)  # same classes: the table stays frozen
        groups = count_groups(model)
        assert groups["class_table"] == groups["biases"] == groups["other"] == 0, method
        assert n_trainable(model) > 0


def test_bad_settings_are_refused():
    with pytest.raises(DiffFitError, match="lora-targets"):
        parse_lora_targets("qkv,ffn")
    assert parse_lora_targets("attn,mlp") == ("qkv", "proj", "fc1", "fc2")
    for bad in (
        MethodSettings(rank=0),
        MethodSettings(gamma_placement="everywhere"),
        MethodSettings(prompt_tokens=-1),
        MethodSettings(lora_alpha=0),
    ):
        with pytest.raises(DiffFitError):
            prepare_model(tiny(), "difffit", settings=bad)


def test_branch_attn_gamma_folds():
    model = tiny()
    prepare_model(model, "difffit", gamma_blocks=[0, 2], settings=MethodSettings(gamma_placement="branch+attn"))
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
        expected = model(X, T, y(10))
        fold_scale_factors(model)
        assert model.blocks[0].attn.gamma_qkv is None and model.gamma_blocks == []
        torch.testing.assert_close(model(X, T, y(10)), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Adapter files, swapping, merge, peft
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_spec(tmp_path_factory, tiny_vae_dir):
    return write_base(tmp_path_factory.mktemp("base") / "base.safetensors", tiny_vae_dir)


def trained(base_spec, method, settings, seed=0, num_classes=4):
    """The base, a model prepared for `method` with perturbed trainable tensors, and its metadata."""
    base = load_base(base_spec)
    model = copy.deepcopy(base.model)
    prepare_model(model, method, num_classes=num_classes, settings=settings)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    meta = make_meta(
        base,
        model.eval(),
        method,
        new_class_table=True,
        class_names=[f"class{i}" for i in range(num_classes)],
        settings=settings,
    )
    return base, model, meta


@pytest.fixture(scope="module")
def adapters(base_spec, tmp_path_factory):
    """method id -> (adapter path, the trained model), fp32, one per variant. (Outputs are computed in the
    tests: this module-scoped fixture runs before the one-thread fixture, and thread counts change bits.)"""
    folder = tmp_path_factory.mktemp("adapters")
    made = {}
    for seed, (ident, (method, settings)) in enumerate(zip(IDS, VARIANTS, strict=True)):
        base, model, meta = trained(base_spec, method, settings, seed=seed)
        path = folder / f"{ident}.safetensors"
        save_adapter(path, model, base.model.state_dict(), meta, dtype="fp32")
        made[ident] = (str(path), model)
    return made


@pytest.mark.parametrize("ident", IDS)
def test_adapter_file_round_trip(adapters, ident):
    path, model = adapters[ident]
    expected = outputs(model, 4)
    tensors, meta = read_adapter(path)
    method, settings = VARIANTS[IDS.index(ident)]
    assert meta.method == method and meta.settings == settings.for_method(method)
    loaded, _ = load_source(path)
    assert torch.equal(outputs(loaded.model, 4), expected)


def test_fp16_adapter_of_added_modules_is_close(base_spec, tmp_path):
    for method in ADDING:
        base, model, meta = trained(base_spec, method, SMALL)
        save_adapter(tmp_path / "a.safetensors", model, base.model.state_dict(), meta)
        loaded, _ = load_source(str(tmp_path / "a.safetensors"))
        torch.testing.assert_close(outputs(loaded.model, 4), outputs(model, 4), atol=2e-3, rtol=0)


def test_swapping_adapters_of_different_methods_restores_the_base_exactly(base_spec, adapters):
    base = load_base(base_spec)
    model = base.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(name, type(m)) for name, m in model.named_modules()]
    flags = [p.requires_grad for p in model.parameters()]
    reference = outputs(model, 10)
    swapper = AdapterSwapper(base)
    for ident in (
        "lora",
        "adapter-parallel",
        "difffit-branch+attn",
        "vpt-deep",
        "lora-mlp-adaLN",
        "adapter-sequential",
        "full",
        "lora",
    ):
        path, trained_model = adapters[ident]
        expected = outputs(trained_model, 4)
        swapper.apply(*read_adapter(path))  # apply restores the previous adapter first
        assert torch.equal(outputs(model, 4), expected), ident
        swapper.restore()
        assert [(name, type(m)) for name, m in model.named_modules()] == modules, ident
        assert model.state_dict().keys() == state.keys() and not hasattr(model, "peft_config")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()), ident
        assert [p.requires_grad for p in model.parameters()] == flags
        assert torch.equal(outputs(model, 10), reference), ident


def test_multi_adapter_sampling_and_eval_fid_for_every_method(adapters, tmp_path, toy_data):
    """`sample A B C ...` (one base, adapters swapped in) and `eval-fid ADAPTER` for every method."""
    from difffit.engine.evaluation.inception import random_inception_weights
    from difffit.engine.evaluation.metrics import evaluate
    from difffit.engine.evaluation.sample import SamplingOptions, generate
    from difffit.engine.methods.sources import iter_sources

    paths = [adapters[ident][0] for ident in IDS]
    for ident, (_, loaded, meta, _) in zip(IDS, iter_sources(paths), strict=True):
        alone, _ = load_source(adapters[ident][0])
        options = SamplingOptions(scheduler="ddim", steps=2, seed=0, batch_size=2, device="cpu")
        images = generate(loaded, 2, options, progress=False)
        assert images.shape == (2, 16, 16, 3) and meta.method == VARIANTS[IDS.index(ident)][0]
        assert torch.equal(images, generate(alone, 2, options, progress=False)), ident  # swapped in = loaded alone

    weights = random_inception_weights(tmp_path / "inception.pth")
    for ident in ("vpt-deep", "adapter-parallel"):
        result = evaluate(
            adapters[ident][0],
            str(toy_data),
            num_samples=4,
            inception_weights=str(weights),
            device="cpu",
            sampling=SamplingOptions(scheduler="ddim", steps=2),
            progress=False,
        )
        assert np.isfinite(result.metrics["fid"]) and result.num_generated == 4


@pytest.mark.parametrize("method", [m for m in METHODS if m not in FOLDABLE])
def test_merge_refuses_methods_that_cannot_fold(adapters, method, tmp_path):
    with pytest.raises(DiffFitError) as refused:
        merge_adapter(adapters[method][0], tmp_path / "m.safetensors")
    message = refused.value.message
    assert "sample from the adapter" in message and message.count(". ") == 0 and message.endswith(").")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("ident", ["lora", "lora-mlp-adaLN"])
def test_lora_merges_into_both_formats(adapters, ident, tmp_path):
    path, model = adapters[ident]
    expected = outputs(model, 4)
    merge_adapter(path, tmp_path / "merged.safetensors")
    merged = load_base(str(tmp_path / "merged.safetensors"))
    assert all(type(b.attn.qkv) is nn.Linear for b in merged.model.blocks)  # plain weights, no LoRA layers
    torch.testing.assert_close(outputs(merged.model, 4), expected, atol=1e-5, rtol=1e-5)

    merge_adapter(path, tmp_path / "pipeline", fmt="diffusers")
    pipeline = load_base(str(tmp_path / "pipeline"))
    with torch.no_grad():
        got = pipeline.model(X, T, torch.tensor([0, 3, 1000]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_peft_export_loads_with_peft_model_from_pretrained(adapters, base_spec, tmp_path):
    from peft import PeftModel

    from difffit.engine.methods.trainable import resize_class_table

    path, model = adapters["lora"]
    expected = outputs(model, 4)
    folder = tmp_path / "peft"
    merge_adapter(path, folder, fmt="peft")
    assert {p.name for p in folder.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4

    dit = load_base(base_spec).model
    resize_class_table(dit, 4)  # the adapter's 4 classes (their rows come from the export)
    peft_model = PeftModel.from_pretrained(dit, str(folder)).eval()
    with torch.no_grad():
        got = peft_model(X, T, y(4))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)

    with pytest.raises(DiffFitError, match="LoRA adapters only"):
        merge_adapter(adapters["difffit"][0], tmp_path / "p2", fmt="peft")


# ---------------------------------------------------------------------------------------------
# Training: every method learns and resumes exactly
# ---------------------------------------------------------------------------------------------

FIT_SETTINGS = dict(rank=4, adapter_dim=8, prompt_tokens=2)


@pytest.fixture
def conf(tmp_path, toy_data, tiny_base_file, tiny_vae_dir):
    def make(**overrides) -> FitConfig:
        options = dict(
            data=str(toy_data),
            base=str(tiny_base_file),
            vae=str(tiny_vae_dir),
            steps=6,
            batch_size=4,
            save_every=0,
            sample_every=0,
            num_workers=0,
            cache_dir=str(tmp_path / "cache"),
            out=str(tmp_path / "run"),
            adapter_dtype="fp32",
            **FIT_SETTINGS,
        )
        return FitConfig.from_options(options | overrides)

    return make


@pytest.mark.parametrize("method", METHODS)
def test_loss_falls_for_every_method(conf, method):
    # The tiny base's adaLN gates are near zero, which damps what the added modules can change: they
    # learn slowly here (LoRA ~15% in 80 steps), hence the high learning rate and the loose bound.
    lr = 1e-3 if method == "full" else 3e-2
    result = fit(conf(method=method, steps=80, batch_size=8, lr=lr, ema=False), progress=False)
    losses = [json.loads(line)["loss"] for line in (result.out_dir / "log.jsonl").read_text().splitlines()]
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10]), losses
    _, meta = read_adapter(result.adapter)
    assert meta.method == method and meta.settings == MethodSettings(**FIT_SETTINGS).for_method(method)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "difffit"])  # difffit: test_train.py
def test_resume_is_exact_for_every_method(tmp_path, conf, method):
    full = fit(conf(method=method, steps=6, save_every=3, out=str(tmp_path / "full")), progress=False)
    fit(conf(method=method, steps=3, save_every=3, out=str(tmp_path / "half")), progress=False)
    resumed = fit(conf(method=method, steps=6, resume=True, out=str(tmp_path / "half")), progress=False)
    assert resumed.start_step == 3
    a, b = adapter_tensors(full.adapter), adapter_tensors(resumed.adapter)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
