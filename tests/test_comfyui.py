"""`difffit merge --format comfyui` against ComfyUI's own loader (its core in ../shared/comfyui, test data).

For each family (tiny PixArt, SD3, FLUX pipelines) and each foldable method, an adapter with non-trivial
trained values (every trained tensor perturbed, gamma away from 1) is exported; ComfyUI's own model class
for the tiny base, holding the base converted by ComfyUI's `convert_diffusers_mmdit`, applies the file
through `load_lora_for_models` and `patch_model`, as the Load LoRA node does. Every weight must equal
difffit's merged transformer converted the same way (to 1e-4 of each row's scale; one row of a gamma
projection has a norm near eps, so gamma must be exact on any row), halfway at strength 0.5, and ComfyUI
must log no key as not loaded.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from comfyui_harness import apply_file, comfy_patcher, import_comfy, native_state
from conftest import run_cli
from safetensors import safe_open
from safetensors.torch import load_file
from t2i_fixtures import make_tiny_flux, make_tiny_pixart, make_tiny_sd3

from difffit.engine.errors import DiffFitError
from difffit.engine.methods.adapter import make_meta, save_adapter
from difffit.engine.methods.baselines import MethodSettings, fold_lora
from difffit.engine.methods.comfyui import METADATA_KEY
from difffit.engine.methods.merge import merge_adapter, merge_formats
from difffit.engine.methods.sources import load_source
from difffit.engine.methods.trainable import prepare_model, trainable_parameters
from difffit.engine.models.families import family_of, load_base

# ComfyUI's MM-DiT is 64 * depth wide with depth heads of 64, so the tiny SD3 is two blocks of two 64-wide heads.
PIPELINES = {
    "pixart": lambda folder: make_tiny_pixart(folder, layers=2),
    "sd3": lambda folder: make_tiny_sd3(
        folder, layers=2, attention_head_dim=64, num_attention_heads=2, caption_projection_dim=128
    ),
    "flux": lambda folder: make_tiny_flux(folder),
}
SMALL_ROW = "transformer_blocks.0.{}.weight"  # a projection gamma scales (block 0 is in the default gamma half)
GAMMA_PROJECTION = {"pixart": "attn1.to_out.0", "sd3": "attn.to_out.0", "flux": "attn.to_out.0"}
SETTINGS = {
    "difffit": MethodSettings(),
    "bitfit": MethodSettings(),
    "lora": MethodSettings(rank=2, lora_alpha=3.0, lora_targets=("attn", "mlp")),
}


@pytest.fixture(scope="module")
def comfy():
    return import_comfy()


def make_pipeline(family: str, tmp_path_factory):
    """(family, folder) of a tiny pipeline whose first gamma projection has one row of norm 1e-7 (below
    float32's eps, 1.19e-7): a DoRA scale without ComfyUI's eps is off by half there."""
    from diffusers.models import ModelMixin

    folder = PIPELINES[family](tmp_path_factory.mktemp(family) / "pipe")
    base = load_base(str(folder))
    transformer: ModelMixin = base.model
    with torch.no_grad():
        row = transformer.get_parameter(SMALL_ROW.format(GAMMA_PROJECTION[family]))[0]
        row.mul_(1e-7 / row.norm())
    transformer.save_pretrained(folder / "transformer")
    return family, folder


@pytest.fixture(scope="module", params=list(PIPELINES))
def pipeline(request, tmp_path_factory):
    return make_pipeline(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    return make_pipeline("pixart", tmp_path_factory)


def make_adapter(folder, method: str, path, placement: str = "branch", tables: bool = False):
    """An fp16 adapter (the default storage) of `method` on the pipeline in `folder`, every trained tensor
    perturbed (gamma too, so it is away from 1) except PixArt's modulation tables unless `tables`: ComfyUI
    never applies a change to those (test_comfyui_leaves_pixart_tables_alone)."""
    base = load_base(str(folder))
    state = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    settings = dataclasses.replace(SETTINGS[method], gamma_placement=placement)
    # gamma in every block, so FLUX's single blocks (linear2; linear1's q/k/v beside its MLP rows) have it too.
    every = list(range(family_of(base.model).depth(base.model))) if method == "difffit" else None
    prepare_model(base.model, method, every, settings=settings)
    torch.manual_seed(len(method))
    with torch.no_grad():
        for name, param in trainable_parameters(base.model).items():
            if tables or not name.endswith("scale_shift_table"):
                param.add_(torch.randn_like(param) * 0.2)
    save_adapter(path, base.model, state, make_meta(base, base.model, method, settings=settings, training={"steps": 1}))
    return path


def merged_state(adapter) -> dict[str, torch.Tensor]:
    """difffit's merged transformer of `adapter` (LoRA and gamma folded), as a diffusers state dict."""
    loaded, meta = load_source(str(adapter))
    fold_lora(loaded.model)
    meta.model_family.fold_gamma(loaded.model)
    return loaded.model.state_dict()


def assert_rows_close(actual: dict, expected: dict, what: str) -> None:
    """Every tensor of `expected` in `actual`, each row within 1e-4 of that row's largest value."""
    assert set(expected) <= set(actual), sorted(set(expected) - set(actual))
    for name, want in expected.items():
        got = actual[name]
        rows = (1, -1) if want.dim() < 2 else (want.shape[0], -1)
        error = (got - want).reshape(rows).abs().amax(1)
        scale = want.reshape(rows).abs().amax(1)
        assert (error <= 1e-4 * scale).all(), (what, name, (error / scale.clamp_min(1e-30)).max().item())


@pytest.mark.parametrize("method", ["difffit", "bitfit", "lora"])
def test_comfyui_applies_the_file_exactly(comfy, pipeline, method, tmp_path):
    family, folder = pipeline
    adapter = make_adapter(folder, method, tmp_path / "adapter.safetensors")
    out = tmp_path / "style.safetensors"
    summary = merge_adapter(str(adapter), out, fmt="comfyui")
    assert summary["format"] == "comfyui" and summary["bytes"] == out.stat().st_size
    assert out.stat().st_size <= 4 * adapter.stat().st_size

    base = load_base(str(folder)).model
    patcher = comfy_patcher(family, base)
    base_native = native_state(family, base.state_dict())
    merged = native_state(family, merged_state(adapter))
    lora = load_file(out)
    assert all(key.startswith("diffusion_model.") for key in lora)
    for strength in (1.0, 0.5):
        weights, not_loaded = apply_file(patcher, lora, strength)
        assert not_loaded == []
        expected = {k: base_native[k] + strength * (merged[k] - base_native[k]) for k in merged}
        assert_rows_close(weights, expected, f"strength {strength}")
    changed = [k for k in merged if not torch.equal(merged[k], base_native[k])]
    assert changed, "the adapter changed nothing: the test would prove nothing"


def test_gamma_on_fused_qkv_is_one_scale_of_the_fused_tensor(comfy, pipeline, tmp_path):
    """gamma on q, k and v (`--gamma-placement branch+attn`) lands on the native fused qkv's rows."""
    family, folder = pipeline
    adapter = make_adapter(folder, "difffit", tmp_path / "adapter.safetensors", placement="branch+attn")
    out = tmp_path / "qkv.safetensors"
    merge_adapter(str(adapter), out, fmt="comfyui")
    base = load_base(str(folder)).model
    weights, not_loaded = apply_file(comfy_patcher(family, base), load_file(out), 1.0)
    assert not_loaded == []
    assert_rows_close(weights, native_state(family, merged_state(adapter)), "branch+attn")


def test_the_file_records_its_base_and_follows_the_output_rules(pipeline, tmp_path):
    family, folder = pipeline
    adapter = make_adapter(folder, "difffit", tmp_path / "adapter.safetensors")
    out = tmp_path / "style.safetensors"
    merge_adapter(str(adapter), out, fmt="comfyui")
    with safe_open(str(out), "pt") as f:
        record = json.loads(f.metadata()[METADATA_KEY])
    assert record["base_fingerprint"] == load_base(str(folder)).fingerprint
    assert record["family"] == family and record["method"] == "difffit"
    with pytest.raises(DiffFitError, match="already exists"):
        merge_adapter(str(adapter), out, fmt="comfyui")
    before = out.read_bytes()
    merge_adapter(str(adapter), out, fmt="comfyui", overwrite=True)
    assert out.read_bytes() == before  # deterministic
    with pytest.raises(DiffFitError, match="input"):
        merge_adapter(str(adapter), adapter, fmt="comfyui", overwrite=True)
    with pytest.raises(DiffFitError, match=r"must end in \.safetensors"):
        merge_adapter(str(adapter), tmp_path / "style.ckpt", fmt="comfyui")
    # A PixArt DiffFit adapter trains the modulation tables, which ComfyUI cannot change: not offered.
    assert ("comfyui" in merge_formats(load_source(str(adapter))[1])) == (family != "pixart")


def test_comfyui_leaves_pixart_tables_alone(comfy, pixart, tmp_path):
    """Why PixArt adapters with changed tables are refused: ComfyUI loads a `.diff` of a block's (or the final
    layer's) scale_shift_table without complaint and never applies it (its patcher patches leaf layers only).
    If a ComfyUI release applies them, this fails: then write the tables instead of refusing."""
    family, folder = pixart
    base = load_base(str(folder)).model
    table = {
        "diffusion_model.blocks.0.scale_shift_table.diff": torch.ones(6, 16),
        "diffusion_model.final_layer.scale_shift_table.diff": torch.ones(2, 16),
    }
    stray = "diffusion_model.blocks.0.attn.no_such_layer.diff_b"  # the capture of ComfyUI's warnings works
    weights, not_loaded = apply_file(comfy_patcher(family, base), {**table, stray: torch.ones(16)}, 1.0)
    native = native_state(family, base.state_dict())
    assert not_loaded == [stray]
    assert torch.equal(weights["blocks.0.scale_shift_table"], native["blocks.0.scale_shift_table"])
    assert torch.equal(weights["final_layer.scale_shift_table"], native["final_layer.scale_shift_table"])
    adapter = make_adapter(folder, "difffit", tmp_path / "adapter.safetensors", tables=True)
    with pytest.raises(DiffFitError, match="ComfyUI does not apply changes to .*scale_shift_table"):
        merge_adapter(str(adapter), tmp_path / "style.safetensors", fmt="comfyui")
    assert not (tmp_path / "style.safetensors").exists()


def test_full_adapters_are_refused_in_one_sentence(monkeypatch, capsys, pipeline, tmp_path):
    family, folder = pipeline
    base = load_base(str(folder))
    state = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    prepare_model(base.model, "full")
    save_adapter(tmp_path / "full.safetensors", base.model, state, make_meta(base, base.model, "full"))
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "merge",
        str(tmp_path / "full.safetensors"),
        "--format",
        "comfyui",
        "--out",
        str(tmp_path / "full-comfyui.safetensors"),
    )
    assert code != 0 and "every weight" in err and "--format diffusers" in err and "Traceback" not in err
    assert "comfyui" not in merge_formats(load_source(str(tmp_path / "full.safetensors"))[1])


def test_dit_adapters_are_refused_in_one_sentence(tmp_path, tiny_base_file):
    dit = load_base(str(tiny_base_file))
    state = {n: p.detach().clone() for n, p in dit.model.named_parameters()}
    prepare_model(dit.model, "difffit")
    save_adapter(tmp_path / "dit.safetensors", dit.model, state, make_meta(dit, dit.model, "difffit"))
    with pytest.raises(DiffFitError, match="no class-conditional DiT") as refused:
        merge_adapter(str(tmp_path / "dit.safetensors"), tmp_path / "dit-comfyui.safetensors", fmt="comfyui")
    assert "--format original" in refused.value.hint


def test_push_uploads_the_comfyui_file_and_the_card_shows_both_uses(pipeline, tmp_path):
    from difffit.engine.sharing.push import push_adapter

    family, folder = pipeline
    methods = ["difffit", "lora"] if family == "pixart" else ["difffit"]  # PixArt's DiffFit trains its tables
    for method in methods:
        adapter = make_adapter(folder, method, tmp_path / method / "adapter.safetensors")
        up = tmp_path / f"up-{method}"
        result = push_adapter(adapter, f"me/{family}-style", dry_run_out=up)
        card = (up / "README.md").read_text()
        assert 'difffit.load_adapter(pipe, hf_hub_download("me/' in card
        offered = not (family == "pixart" and method == "difffit")
        name = f"{family}-style-comfyui.safetensors"
        assert result["files"] == sorted(["README.md", "adapter.safetensors", *([name] if offered else [])])
        assert (
            "## Use in ComfyUI" in card
            and "ComfyUI/models/loras/" in card
            and "**Load LoRA**" in card
            and "0.5 is halfway" in card
        ) == offered
        if offered:
            merge_adapter(str(adapter), tmp_path / method / "direct.safetensors", fmt="comfyui")
            assert (up / name).read_bytes() == (tmp_path / method / "direct.safetensors").read_bytes()


def test_difffits_layout_is_comfyuis_conversion(pipeline):
    """difffit's own layout tables, read backwards, undo ComfyUI's convert_diffusers_mmdit on every tensor of
    the transformer (nothing unmapped, every fused offset and swap the same)."""
    from comfyui_harness import to_diffusers

    family, folder = pipeline
    model = load_base(str(folder)).model
    state = {k: v.float() for k, v in model.state_dict().items()}
    back = to_diffusers(family, native_state(family, state), model)
    assert set(back) == set(state) - {"pos_embed.pos_embed"}  # SD3's fixed positions: a buffer, never trained
    assert all(torch.equal(back[k], state[k]) for k in back)
