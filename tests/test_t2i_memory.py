"""Memory for large bases on the text-to-image families: fp8 frozen weights (with DiffFit's gamma and with
LoRA on top) and gradient checkpointing, on a tiny PixArt; `fit` end to end with both.

fp8 runs on the CPU here through the dequantizing reference matmul (`kernel=False`, as tests/test_fp8.py
does); `fit` refuses fp8 on a CPU, so the fit tests declare this CPU fp8-capable and choose that path.
"""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors import safe_open
from t2i_fixtures import make_captioned_data, make_tiny_pixart, make_tiny_transformer
from torch import nn

from difffit.engine import devices
from difffit.engine.errors import DiffFitError
from difffit.engine.methods.baselines import MethodSettings, lora_layers
from difffit.engine.methods.merge import merge_adapter
from difffit.engine.methods.sources import load_source
from difffit.engine.methods.trainable import prepare_model, trainable_parameters
from difffit.engine.models.diffusion import GaussianDiffusion
from difffit.engine.models.families import PIXART
from difffit.engine.models.fp8 import E4M3, FP8FrozenLinear, quantize_frozen_linears, reference_linear
from difffit.engine.models.scaled_linear import ScaledLinear, fold_scaled_linears
from difffit.engine.training import setup as fit_setup
from difffit.engine.training.config import FitConfig
from difffit.engine.training.train import fit

# Per PixArt block: q, k, v, out of self- and cross-attention, and the MLP's two Linears.
BLOCK_LINEARS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
)
TEXT_TOKENS, TEXT_WIDTH = 6, 32


def perturbed(model: nn.Module, scale: float = 0.05) -> nn.Module:
    """Random offsets on every tensor (gamma and the tables included): zero-initialised parts would hide
    the matmuls they gate, and gamma at exactly 1 would hide a gamma that is not applied."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def batch(size: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(size, 4, 8, 8, generator=g)
    text = {
        "prompt_embeds": torch.randn(size, TEXT_TOKENS, TEXT_WIDTH, generator=g),
        "prompt_attention_mask": torch.ones(size, TEXT_TOKENS, dtype=torch.long),
    }
    return x0, torch.tensor([10, 500, 990])[:size], text, torch.randn(size, 4, 8, 8, generator=g)


def training_loss(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """The hybrid loss PixArt trains with (linear betas, as the tiny pipeline's), on fixed draws."""
    x0, t, text, noise = batch(seed=seed)
    forward = PIXART.forward(model, None)
    return GaussianDiffusion().training_losses(lambda x, s: forward(x, s, text).float(), x0, t, noise)["loss"].mean()


def gradients(model: nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = training_loss(model)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in trainable_parameters(model).items()}


def difffit_model(method: str = "difffit", **settings) -> nn.Module:
    model = make_tiny_transformer(layers=4).train()
    prepare_model(model, method, settings=MethodSettings(**settings))
    return perturbed(model)


# -- fp8 on the model ---------------------------------------------------------------------------------


def test_fp8_quantizes_every_block_linear_and_keeps_embedders_modulation_and_final_layer():
    model = difffit_model()
    trained = trainable_parameters(model)
    assert quantize_frozen_linears(model, keep=PIXART.fp8_keep(), kernel=False) == 4 * len(BLOCK_LINEARS)
    for block in model.transformer_blocks:
        assert all(isinstance(block.get_submodule(path), FP8FrozenLinear) for path in BLOCK_LINEARS)
    kept = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    assert kept and all(
        name.startswith(("adaln_single.", "caption_projection.")) or name == "proj_out" for name in kept
    )
    # gamma's projections went float8 too, keeping their gamma: the same Parameter objects under the same
    # names, so optimizer, checkpoints and adapter files are unchanged; no float8 tensor reaches a state dict.
    assert trainable_parameters(model).keys() == trained.keys()
    assert all(trainable_parameters(model)[n] is p for n, p in trained.items())
    assert PIXART.gamma_blocks(model) == [0, 1]
    assert not any(t.dtype == E4M3 for t in model.state_dict().values())


def test_fp8_with_gamma_matches_the_dequantized_reference_and_trains_every_tensor():
    reference = difffit_model()
    model = difffit_model()
    quantize_frozen_linears(model, keep=PIXART.fp8_keep(), kernel=False)
    # The reference runs the same float8 weights dequantized, in fp32: what fp8 approximates (activations
    # and gradients are float8 too, hence the tolerance).
    for name, module in model.named_modules():
        if isinstance(module, FP8FrozenLinear):
            reference.get_submodule(name).weight.data = module.dequantized_weight()
    loss, grads = gradients(model)
    ref_loss, ref_grads = gradients(reference)
    assert loss == pytest.approx(ref_loss, rel=0.05)
    assert grads.keys() == ref_grads.keys() and all(torch.isfinite(g).all() for g in grads.values())
    assert_gradients_close(grads, ref_grads, 0.1)
    assert any(".gamma_" in name for name in grads)


def assert_gradients_close(grads: dict, ref_grads: dict, rel: float) -> None:
    """Each tensor's gradient within `rel` of the reference's norm, plus a floor at 1e-3 of the largest
    gradient: a key bias's gradient is 0 in exact arithmetic (softmax ignores a shift shared by a row), so
    its float8 rounding is compared with the gradients around it, not with its own zero."""
    floor = 1e-3 * max(g.norm() for g in ref_grads.values())
    for name, ref in ref_grads.items():
        assert (grads[name] - ref).norm() <= rel * ref.norm() + floor, name


def test_gamma_scales_an_fp8_projection():
    linear = nn.Linear(32, 16).requires_grad_(False)
    linear.bias.requires_grad_(True)
    scaled = ScaledLinear(linear)
    with torch.no_grad():
        scaled.gamma_.uniform_(0.5, 2.0)
    fp8 = FP8FrozenLinear(scaled, kernel=False)
    assert fp8.gamma_ is scaled.gamma_ and fp8.bias is linear.bias
    x = torch.randn(5, 32)
    torch.testing.assert_close(fp8(x).float(), reference_linear(fp8, x), rtol=0.05, atol=0.05)
    expected = torch.nn.functional.linear(x, fp8.dequantized_weight(), linear.bias) * scaled.gamma_
    torch.testing.assert_close(reference_linear(fp8, x), expected)


def test_folding_refuses_gamma_on_a_float8_projection():
    model = difffit_model()
    quantize_frozen_linears(model, keep=PIXART.fp8_keep(), kernel=False)
    with pytest.raises(ValueError, match="fold on the base's own weights"):
        fold_scaled_linears(model)


def test_lora_on_fp8_frozen_base_layers():
    reference = difffit_model("lora", rank=4)
    model = difffit_model("lora", rank=4)
    swapped = quantize_frozen_linears(model, keep=PIXART.fp8_keep(), kernel=False)
    layers = lora_layers(model)
    # peft's layers wrap the quantized projections; LoRA's own A and B stay trainable fp32 Linears.
    assert layers and all(isinstance(layer.get_base_layer(), FP8FrozenLinear) for _, layer in layers)
    assert swapped == 4 * len(BLOCK_LINEARS)
    for name, module in model.named_modules():
        if isinstance(module, FP8FrozenLinear):
            reference.get_submodule(name).weight.data = module.dequantized_weight()
    loss, grads = gradients(model)
    _, ref_grads = gradients(reference)
    assert grads.keys() == ref_grads.keys() and any(".lora_B." in n for n in grads)
    assert_gradients_close(grads, ref_grads, 0.1)


# -- gradient checkpointing -----------------------------------------------------------------------------


def saved_bytes(model: nn.Module) -> int:
    """Bytes autograd keeps for the backward of one training loss (outside checkpointed regions)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        training_loss(model)
    return total


@pytest.mark.parametrize("fp8", [False, True])
def test_grad_checkpointing_keeps_loss_and_gradients_and_saves_less(fp8):
    model = difffit_model()
    if fp8:
        quantize_frozen_linears(model, keep=PIXART.fp8_keep(), kernel=False)
    loss, grads = gradients(model)
    plain = saved_bytes(model)
    PIXART.set_gradient_checkpointing(model, True)
    assert model.gradient_checkpointing
    # Checkpointing is on for real: the blocks' activations are not kept for the backward.
    assert saved_bytes(model) < 0.6 * plain
    loss_ckpt, grads_ckpt = gradients(model)
    # The recomputed forward is the same computation (float32 on the CPU, float8 activations quantized
    # with the same scales), so the numbers are the same, not merely close.
    assert loss_ckpt == loss
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=0, msg=name)
    PIXART.set_gradient_checkpointing(model, False)
    assert not model.gradient_checkpointing


# -- fit end to end ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return make_tiny_pixart(tmp_path_factory.mktemp("pixart") / "pipe")


@pytest.fixture
def conf(tmp_path, pipeline_dir):
    data = make_captioned_data(tmp_path / "data")

    def make(**overrides) -> FitConfig:
        options = dict(
            data=str(data),
            base=str(pipeline_dir),
            steps=3,
            batch_size=4,
            save_every=0,
            sample_every=0,
            num_workers=0,
            cache_dir=str(tmp_path / "cache"),
            out=str(tmp_path / "run"),
            adapter_dtype="fp32",
            compile="off",
        )
        return FitConfig.from_options({**options, **overrides})

    return make


@pytest.fixture
def fp8_cpu(monkeypatch):
    """This CPU declared fp8-capable, and fit's quantization on the dequantizing reference path."""
    monkeypatch.setattr(devices, "fp8_support", lambda device: None)
    monkeypatch.setattr(fit_setup, "quantize_frozen_linears", functools.partial(quantize_frozen_linears, kernel=False))


def stored_dtypes(path) -> set[torch.dtype]:
    with safe_open(str(path), "pt") as f:
        return {f.get_tensor(key).dtype for key in f.keys()}


@pytest.mark.parametrize("method", ["difffit", "lora"])
def test_fp8_fit_previews_resumes_and_writes_plain_files(conf, fp8_cpu, tmp_path, method):
    result = fit(conf(mixed_precision="fp8", method=method, sample_every=2, save_every=2, rank=2), progress=False)
    assert result.loss is not None and result.step == 3
    assert (result.out_dir / "samples" / "step-0000000.png").is_file()  # previews sample the fp8 model
    # fp8 is a speed and memory mode, never a file format: adapter, checkpoints and merged model hold none.
    assert stored_dtypes(result.adapter) == {torch.float32}
    for checkpoint in (result.out_dir / "checkpoints").rglob("*.safetensors"):
        assert E4M3 not in stored_dtypes(checkpoint)
    merged = tmp_path / "merged"
    merge_adapter(result.adapter, merged)
    assert all(E4M3 not in stored_dtypes(f) for f in (merged / "transformer").glob("*.safetensors"))
    _, meta = load_source(str(result.adapter))
    assert meta.gamma_blocks == ([0, 1] if method == "difffit" else [])
    resumed = fit(conf(mixed_precision="fp8", method=method, steps=4, resume=True, rank=2), progress=False)
    assert resumed.start_step == 3 and resumed.step == 4


def test_fp8_fit_trains_the_same_tensors_as_bf16(conf, fp8_cpu, tmp_path):
    fp8 = fit(conf(mixed_precision="fp8", steps=2), progress=False)
    bf16 = fit(conf(mixed_precision="bf16", steps=2, out=str(tmp_path / "bf16")), progress=False)
    with safe_open(str(fp8.adapter), "pt") as a, safe_open(str(bf16.adapter), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():  # two steps apart only by fp8 rounding: close, and really trained
            assert (a.get_tensor(key) - b.get_tensor(key)).abs().max() < 0.05, key
    assert fp8.loss == pytest.approx(bf16.loss, rel=0.1)


def test_grad_checkpointing_in_fit_gives_the_same_adapter(conf, tmp_path):
    plain = fit(conf(steps=2), progress=False)
    checkpointed = fit(conf(steps=2, grad_checkpointing=True, out=str(tmp_path / "ckpt")), progress=False)
    with safe_open(str(plain.adapter), "pt") as a, safe_open(str(checkpointed.adapter), "pt") as b:
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    assert checkpointed.loss == plain.loss


def test_fp8_is_refused_on_the_cpu_in_one_sentence(conf, tmp_path):
    with pytest.raises(DiffFitError, match="needs an NVIDIA GPU with FP8 tensor cores; this run is on cpu"):
        fit(conf(mixed_precision="fp8"), progress=False)
    assert not (tmp_path / "run").exists()


def test_fp8_with_full_fine_tuning_is_refused(conf, fp8_cpu):
    with pytest.raises(DiffFitError, match="--method full trains every weight matrix"):
        fit(conf(mixed_precision="fp8", method="full"), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (sm89+ for the fp8 kernel)")
def test_fp8_kernel_with_gamma_and_checkpointing_on_cuda():
    if (reason := devices.fp8_support("cuda")) is not None:
        pytest.skip(reason)
    fast, slow = difffit_model().cuda(), difffit_model().cuda()
    quantize_frozen_linears(fast, keep=PIXART.fp8_keep(), kernel=True)
    quantize_frozen_linears(slow, keep=PIXART.fp8_keep(), kernel=False)
    PIXART.set_gradient_checkpointing(fast, True)

    def cuda_gradients(model):
        x0, t, text, noise = (v.cuda() if torch.is_tensor(v) else {k: w.cuda() for k, w in v.items()} for v in batch())
        forward = PIXART.forward(model, None)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (
                GaussianDiffusion()
                .training_losses(lambda x, s: forward(x, s, text).float(), x0, t, noise)["loss"]
                .mean()
            )
        loss.backward()
        return loss.item(), {n: p.grad.float().cpu() for n, p in trainable_parameters(model).items()}

    loss, grads = cuda_gradients(fast)
    ref_loss, ref_grads = cuda_gradients(slow)
    assert loss == pytest.approx(ref_loss, rel=0.05)
    assert_gradients_close(grads, ref_grads, 0.1)


def test_a_model_too_large_for_the_device_is_one_sentence(pipeline_dir, tmp_path, monkeypatch, capsys):
    """A 12B base on a 24 GB card without fp8 runs out of memory while moving to the GPU: one sentence
    naming what to try, no traceback (here the move is made to fail as CUDA's allocator would)."""
    from test_sample import run_cli

    move = nn.Module.to

    def out_of_memory(module, *args, **kwargs):
        if type(module).__name__ == "PixArtTransformer2DModel":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 22.00 GiB")
        return move(module, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", out_of_memory)
    data = make_captioned_data(tmp_path / "data")
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "fit",
        data,
        "--base",
        pipeline_dir,
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--sample-every",
        "0",
        "--compile",
        "off",
        "--out",
        tmp_path / "run",
        "--cache-dir",
        tmp_path / "cache",
    )
    assert code == 1 and "Traceback" not in err, err
    assert "The PixArt model does not fit in the memory of cpu" in err and "--grad-checkpointing" in err
