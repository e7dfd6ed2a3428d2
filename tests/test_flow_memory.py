"""What the memory and bucket work asks of the SD3 and FLUX families: which Linears fp8 leaves bf16 (the
embedders, the adaLN modulation of both streams, the output layer; FLUX's fused single-block projection goes
float8), fp8 on the dequantizing reference path, gradient checkpointing that changes no number, and
aspect-ratio buckets: batches of one size through each family's forward, sampling at a bucket's size."""

from __future__ import annotations

import fnmatch

import pytest
import torch
from t2i_fixtures import make_captioned_data, make_mixed_aspect_data, record_batch_shapes, t2i_fit_config
from test_flow_families import CASES, inputs, perturbed
from torch import nn

from difffit.engine.methods.trainable import prepare_model, trainable_parameters
from difffit.engine.models.families import load_base
from difffit.engine.models.fp8 import FP8FrozenLinear, quantize_frozen_linears
from difffit.engine.training.train import fit

# The Linears each family keeps bf16 under fp8, by name in the tiny models (FLUX: 2 joint + 2 single blocks).
KEPT = {
    "sd3": {
        "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2",
        "time_text_embed.text_embedder.linear_1",
        "time_text_embed.text_embedder.linear_2",
        "context_embedder",
        "norm_out.linear",
        "proj_out",
        *(f"transformer_blocks.{i}.{n}.linear" for i in range(4) for n in ("norm1", "norm1_context")),
    },
    "flux": {
        "x_embedder",
        "context_embedder",
        "norm_out.linear",
        "proj_out",
        *(
            f"time_text_embed.{e}.linear_{i}"
            for e in ("timestep_embedder", "guidance_embedder", "text_embedder")
            for i in (1, 2)
        ),
        *(f"transformer_blocks.{i}.{n}.linear" for i in range(2) for n in ("norm1", "norm1_context")),
        *(f"single_transformer_blocks.{i}.norm.linear" for i in range(2)),
    },
}


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    return CASES[request.param]


def difffit_model(case):
    model = case.transformer().train()
    prepare_model(model, "difffit", gamma_blocks=list(range(case.family.depth(model))))
    return perturbed(model)


def loss_and_grads(case, model, autocast: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    """`autocast`: under bf16 autocast, as fit runs fp8 (float8 Linears return bf16 beside fp32 q/k norms)."""
    x, t, text = inputs(case, seed=4)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = case.family.forward(model, None)(x, t, text)
    loss = (out.float() - target).pow(2).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in trainable_parameters(model).items()}


def test_fp8_keeps_embedders_modulation_and_output_layer_and_quantizes_every_block_matrix(case):
    model = difffit_model(case)
    kept = KEPT[case.family.name]
    assert {
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in case.family.fp8_keep())
    } == kept
    swapped = quantize_frozen_linears(model, keep=case.family.fp8_keep(), kernel=False)
    plain = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    assert plain == kept and swapped > 0
    fp8 = {name for name, m in model.named_modules() if isinstance(m, FP8FrozenLinear)}
    if case.family.name == "flux":  # the single blocks' fused output, with its gamma, is float8 like the rest
        assert {"single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_mlp"} <= fp8
    assert {
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_add_out",
        "transformer_blocks.0.ff.net.2",
        "transformer_blocks.0.ff_context.net.2",
    } <= fp8


def test_fp8_matches_the_dequantized_reference(case):
    reference, model = difffit_model(case), difffit_model(case)
    quantize_frozen_linears(model, keep=case.family.fp8_keep(), kernel=False)
    for name, module in model.named_modules():
        if isinstance(module, FP8FrozenLinear):
            reference.get_submodule(name).weight.data = module.dequantized_weight()
    loss, grads = loss_and_grads(case, model, autocast=True)
    ref_loss, ref_grads = loss_and_grads(case, reference, autocast=True)
    # float8 activations and gradients: close, not equal
    assert loss == pytest.approx(ref_loss, rel=0.05) and grads.keys() == ref_grads.keys()
    assert all(torch.isfinite(g).all() for g in grads.values()) and any(".gamma_" in n for n in grads)


def test_grad_checkpointing_changes_no_number(case):
    model = difffit_model(case)
    loss, grads = loss_and_grads(case, model)
    case.family.set_gradient_checkpointing(model, True)
    assert model.gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads(case, model)
    assert loss_ckpt == loss and grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=0, msg=name)
    case.family.set_gradient_checkpointing(model, False)
    assert not model.gradient_checkpointing


def test_real_bases_take_sides_in_whole_patches(case):
    """SD3: VAE factor 8 x patch 2; FLUX: VAE factor 8 x its 2 x 2 packing: 16 px either way."""
    alias = next(iter(case.family.kind.aliases))
    assert case.family.size_multiple(load_base(alias, info=True)) == 16


# 16 x 16 and 32 x 8 px buckets, batch 4; the two 1:4 images merge into the square bucket.
MIXED = {(40, 10): 4, (20, 20): 5, (10, 40): 2}


def test_mixed_aspect_data_trains_in_buckets_and_samples_at_a_buckets_size(case, tmp_path, monkeypatch):
    from difffit.engine.evaluation.sample import SamplingOptions, generate
    from difffit.engine.methods.sources import load_source

    pipe = case.pipeline(tmp_path / "pipe")
    shapes = record_batch_shapes(monkeypatch)
    result = fit(t2i_fit_config(make_mixed_aspect_data(tmp_path / "data", MIXED), pipe, tmp_path), progress=False)
    assert (
        result.images == 11
        and result.skipped == 0
        and [(b["width"], b["height"]) for b in result.buckets] == [(16, 16), (32, 8)]
    )
    assert set(shapes) == {(4, 16, 8, 8), (4, 16, 4, 16)}  # 16-channel latents of 16 x 16 and 32 x 8 px
    base, _ = load_source(str(result.adapter))
    options = SamplingOptions(cfg_scale=None, scheduler=None, steps=2, device="cpu", width=32, height=8)
    assert generate(base, 1, options, prompts=["a red picture"], progress=False).shape == (1, 8, 32, 3)


def test_fp8_fit_with_checkpointing_runs_and_writes_a_plain_adapter(case, tmp_path, monkeypatch):
    """fit --mixed-precision fp8 --grad-checkpointing on this CPU declared fp8-capable (quantization on the
    dequantizing reference path): it trains, and the adapter holds float32 tensors only."""
    import functools

    from safetensors import safe_open

    from difffit.engine import devices
    from difffit.engine.training import setup as fit_setup

    monkeypatch.setattr(devices, "fp8_support", lambda device: None)
    monkeypatch.setattr(fit_setup, "quantize_frozen_linears", functools.partial(quantize_frozen_linears, kernel=False))
    result = fit(
        t2i_fit_config(
            make_captioned_data(tmp_path / "data", per_caption=2),
            case.pipeline(tmp_path / "pipe"),
            tmp_path,
            steps=2,
            batch_size=2,
            mixed_precision="fp8",
            grad_checkpointing=True,
        ),
        progress=False,
    )
    assert result.step == 2 and result.loss is not None and torch.isfinite(torch.tensor(result.loss))
    with safe_open(str(result.adapter), "pt") as f:
        assert {f.get_tensor(key).dtype for key in f.keys()} == {torch.float32}
        assert any(".gamma_" in key for key in f.keys())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (sm89+ for fp8)")
def test_flow_families_fit_and_sample_on_cuda(case, tmp_path):
    """On a GPU (gpu_check.sh's tests stage): fit in bf16 with checkpointing, and in fp8 through `_scaled_mm`
    where the GPU has it; the adapters sample finite images in bf16 at a non-square size."""
    from difffit.engine import devices
    from difffit.engine.evaluation.sample import SamplingOptions, generate
    from difffit.engine.methods.sources import load_source

    pipe, data = case.pipeline(tmp_path / "pipe"), make_captioned_data(tmp_path / "data", per_caption=2)
    precisions = ["bf16"] + (["fp8"] if devices.fp8_support("cuda") is None else [])
    for precision in precisions:
        result = fit(
            t2i_fit_config(
                data,
                pipe,
                tmp_path,
                steps=3,
                batch_size=2,
                out=str(tmp_path / precision),
                device="cuda",
                mixed_precision=precision,
                grad_checkpointing=True,
            ),
            progress=False,
        )
        assert result.step == 3 and torch.isfinite(torch.tensor(result.loss))
        base, _ = load_source(str(result.adapter))
        options = SamplingOptions(
            cfg_scale=None, scheduler=None, steps=2, device="cuda", mixed_precision="bf16", width=32, height=16
        )
        images = generate(base, 2, options, prompts=["a red square"], progress=False)
        assert images.shape == (2, 16, 32, 3)
