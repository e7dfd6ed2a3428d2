"""`difffit.load_adapter` / `unload_adapter` on stock diffusers pipelines (tiny PixArt, SD3, FLUX built here):
the adapted transformer is the merged one bit for bit and draws its images, unloading gives the base back bit
for bit with nothing left over, and a wrong base, a second adapter or an adapter of another kind is refused in
one sentence. Nothing is downloaded (`hf://` adapters come from a pre-filled Hub cache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from t2i_fixtures import PIPELINES, make_tiny_flux, make_tiny_sd3
from test_adapter import train, write_base
from test_share import cached_repo, hf_home  # noqa: F401 (hf_home: a fixture)

import difffit
from difffit.engine.errors import DiffFitError
from difffit.engine.methods.adapter import make_meta, save_adapter
from difffit.engine.methods.baselines import MethodSettings
from difffit.engine.methods.trainable import prepare_model, trainable_parameters
from difffit.engine.models.families import load_base

METHODS = ("difffit", "lora", "bitfit", "full")
PROMPTS = ["a red square", "a bowl of noodles"]


@pytest.fixture(scope="module", params=list(PIPELINES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipeline_dir(family, tmp_path_factory) -> Path:
    return PIPELINES[family](tmp_path_factory.mktemp(family) / "pipe")


def make_adapter(pipeline_dir: Path, path: Path, method: str, seed: int = 3) -> Path:
    """An adapter of `method` whose every trained tensor moved well away from the base (gamma from 1, LoRA's B
    from 0), saved as training saves it (fp16 deltas)."""
    base = load_base(str(pipeline_dir))
    state = {name: p.detach().clone() for name, p in base.model.named_parameters()}
    settings = MethodSettings(rank=2)
    prepare_model(base.model, method, settings=settings)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(base.model).values():
            p.add_(torch.randn_like(p) * 0.2)
    save_adapter(path, base.model, state, make_meta(base, base.model, method, settings=settings, training={"steps": 2}))
    return path


def stock(folder: Path, dtype: torch.dtype = torch.float32):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe, seed: int = 7) -> np.ndarray:
    """Two images from the stock pipeline's own call, as uint8 levels."""
    extra = {"use_resolution_binning": False, "clean_caption": False} if "PixArt" in type(pipe).__name__ else {}
    out = pipe(
        PROMPTS,
        num_inference_steps=2,
        height=16,
        width=16,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **extra,
    ).images
    return np.round(out * 255).astype(np.int16)


def snapshot(transformer) -> tuple[dict, list, set, dict]:
    """What must come back after unloading: every tensor (cloned), the module tree, the instance attributes,
    which parameters take gradients."""
    return (
        {name: t.detach().clone() for name, t in transformer.state_dict().items()},
        [(name, type(m)) for name, m in transformer.named_modules()],
        set(vars(transformer)),
        {name: p.requires_grad for name, p in transformer.named_parameters()},
    )


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


def assert_is_base(transformer, base: tuple[dict, list, set, dict]) -> None:
    tensors, modules, attributes, flags = base
    assert {name: p.requires_grad for name, p in transformer.named_parameters()} == flags
    assert_same_tensors(transformer.state_dict(), tensors)
    assert [(name, type(m)) for name, m in transformer.named_modules()] == modules  # no peft or gamma layer left
    assert set(vars(transformer)) == attributes  # no peft_config, no record of the adapter


@pytest.mark.parametrize("method", METHODS)
def test_the_stock_pipeline_becomes_the_merged_one_and_unloads_to_the_base(pipeline_dir, tmp_path, method):
    adapter = make_adapter(pipeline_dir, tmp_path / "a.safetensors", method)
    difffit.merge_adapter(str(adapter), tmp_path / "merged")
    merged = stock(tmp_path / "merged")
    pipe = stock(pipeline_dir)
    before = draw(pipe)
    base = snapshot(pipe.transformer)  # after a call: FLUX's pipeline gives its transformer a diffusers hook

    meta = difffit.load_adapter(pipe, adapter)
    assert meta.method == method
    # A stock module tree holding exactly the merged transformer's weights: gamma and LoRA folded, as merge does.
    assert [(name, type(m)) for name, m in pipe.transformer.named_modules()] == base[1]
    assert_same_tensors(pipe.transformer.state_dict(), merged.transformer.state_dict())
    adapted = draw(pipe)
    assert np.abs(adapted - draw(merged)).max() <= 1
    assert np.abs(adapted - before).max() > 8  # the adapter changes the images: applying nothing fails above

    difffit.unload_adapter(pipe)
    assert_is_base(pipe.transformer, base)
    assert np.array_equal(draw(pipe), before)
    difffit.unload_adapter(pipe)  # nothing applied: nothing to do
    assert_is_base(pipe.transformer, base)


@pytest.mark.parametrize("method", ["difffit", "lora"])
def test_a_bf16_pipeline_gets_the_merged_bf16_weights_rounded_once(tmp_path, method):
    """On a base stored in bf16 (as FLUX.1's is) loaded in bf16, every tensor is computed in float32 and rounded
    once, as merge's (which saves in the base file's dtype): bit for bit the merged bf16 transformer."""
    folder = make_tiny_flux(tmp_path / "pipe")
    stock(folder, torch.bfloat16).transformer.save_pretrained(folder / "transformer")
    adapter = make_adapter(folder, tmp_path / "a.safetensors", method)
    difffit.merge_adapter(str(adapter), tmp_path / "merged")
    pipe = stock(folder, torch.bfloat16)
    base = snapshot(pipe.transformer)
    difffit.load_adapter(pipe.transformer, adapter)  # the transformer alone works as the pipeline does
    merged = stock(tmp_path / "merged", torch.bfloat16).transformer
    assert_same_tensors(pipe.transformer.state_dict(), merged.state_dict())
    difffit.unload_adapter(pipe.transformer)
    assert_is_base(pipe.transformer, base)


def test_a_wrong_base_is_refused_unless_forced(family, pipeline_dir, tmp_path, capsys):
    other = PIPELINES[family](tmp_path / "other", seed=1)  # the same architecture, other weights
    adapter = make_adapter(pipeline_dir, tmp_path / "a.safetensors", "difffit")
    pipe = stock(other)
    base = snapshot(pipe.transformer)
    with pytest.raises(
        DiffFitError, match=r"was trained on .* \(fingerprint \w+\), but this \w+ has fingerprint \w+\.$"
    ) as refused:
        difffit.load_adapter(pipe, adapter)
    assert "force_base=True" in refused.value.hint
    assert_is_base(pipe.transformer, base)  # refused before anything changed
    difffit.load_adapter(pipe, adapter, force_base=True)
    assert "Applying it anyway (force_base=True)" in capsys.readouterr().err
    assert any(not torch.equal(t, base[0][name]) for name, t in pipe.transformer.state_dict().items())
    difffit.unload_adapter(pipe)
    assert_is_base(pipe.transformer, base)


def test_a_second_adapter_is_refused_until_the_first_is_unloaded(pipeline_dir, tmp_path):
    first = make_adapter(pipeline_dir, tmp_path / "first.safetensors", "difffit")
    second = make_adapter(pipeline_dir, tmp_path / "second.safetensors", "lora", seed=4)
    difffit.merge_adapter(str(second), tmp_path / "merged")
    pipe = stock(pipeline_dir)
    base = snapshot(pipe.transformer)
    difffit.load_adapter(pipe, first)
    applied = {name: t.clone() for name, t in pipe.transformer.state_dict().items()}
    with pytest.raises(
        DiffFitError,
        match=r"already has the adapter .*first.safetensors applied, and load_adapter "
        r"applies one adapter at a time\.$",
    ):
        difffit.load_adapter(pipe, second, force_base=True)
    assert_same_tensors(pipe.transformer.state_dict(), applied)
    difffit.unload_adapter(pipe)
    difffit.load_adapter(pipe, second)
    assert_same_tensors(pipe.transformer.state_dict(), stock(tmp_path / "merged").transformer.state_dict())
    difffit.unload_adapter(pipe)
    assert_is_base(pipe.transformer, base)


def test_a_hub_adapter_loads_from_the_cache(hf_home, tmp_path):  # noqa: F811 (the fixture imported above)
    folder = make_tiny_sd3(tmp_path / "pipe")
    adapter = make_adapter(folder, tmp_path / "a.safetensors", "difffit")
    cached_repo("me/sd3-difffit", {"adapter.safetensors": adapter, "README.md": "card"})
    by_hub, by_path = stock(folder), stock(folder)
    difffit.load_adapter(by_hub, "hf://me/sd3-difffit")
    difffit.load_adapter(by_path, adapter)
    assert_same_tensors(by_hub.transformer.state_dict(), by_path.transformer.state_dict())


def test_what_is_not_a_text_to_image_adapter_on_its_own_family_is_refused(tmp_path, tiny_vae_dir):
    sd3, flux = make_tiny_sd3(tmp_path / "sd3"), stock(make_tiny_flux(tmp_path / "flux", layers=1))
    base = snapshot(flux.transformer)
    with pytest.raises(DiffFitError, match=r"is an? SD3.* adapter, and this FluxTransformer2DModel is not an? SD3"):
        difffit.load_adapter(flux, make_adapter(sd3, tmp_path / "sd3.safetensors", "difffit"))
    deeper = make_adapter(make_tiny_flux(tmp_path / "deeper", layers=2), tmp_path / "deeper.safetensors", "difffit")
    with pytest.raises(
        DiffFitError, match=r"needs a .* base \(it was trained on .*deeper\), but this Flux\w+ is a "
    ) as other_shape:
        difffit.load_adapter(flux, deeper, force_base=True)  # forcing takes other weights, never other shapes
    assert "with diffusers" in other_shape.value.hint
    fp8 = stock(tmp_path / "deeper")
    fp8.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(
        DiffFitError,
        match="folds the adapter into the transformer's weights, and this Flux.* holds float8_e4m3fn weights",
    ):
        difffit.load_adapter(fp8, deeper, force_base=True)
    dit_base, dit_model, dit_meta = train(write_base(tmp_path / "dit.safetensors", tiny_vae_dir))
    save_adapter(tmp_path / "dit-adapter.safetensors", dit_model, dit_base.model.state_dict(), dit_meta)
    with pytest.raises(DiffFitError, match="is a DiT adapter, and load_adapter applies text-to-image adapters") as dit:
        difffit.load_adapter(flux, tmp_path / "dit-adapter.safetensors")
    assert "difffit sample" in dit.value.hint
    with pytest.raises(DiffFitError, match="is a safetensors file but not a difffit adapter"):
        difffit.load_adapter(flux, sd3 / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(DiffFitError, match="takes a diffusers pipeline or its transformer, not a str"):
        difffit.load_adapter("black-forest-labs/FLUX.1-dev", tmp_path / "sd3.safetensors")
    assert_is_base(flux.transformer, base)
