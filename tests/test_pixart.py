"""PixArt-α/Σ as a family: loading pipelines, what each method trains (also on the real XL/2 config), gamma
placement and folding, adapter files, and refusing what does not apply. Tiny pipelines are built in the test."""

from __future__ import annotations

import json

import pytest
import torch
from t2i_fixtures import make_tiny_pixart, make_tiny_transformer

from difffit.engine.errors import DiffFitError
from difffit.engine.methods.adapter import AdapterSwapper, make_meta, read_adapter, save_adapter
from difffit.engine.methods.baselines import MethodSettings, fold_lora
from difffit.engine.methods.sources import describe_source, load_source
from difffit.engine.methods.trainable import count_groups, describe_method, prepare_model, trainable_parameters
from difffit.engine.models.families import PIXART, family_of, load_base, resolve_base
from difffit.engine.models.families.pixart_bases import XL2_CONFIG
from difffit.engine.models.scaled_linear import ScaledLinear

XL512 = {**XL2_CONFIG, "sample_size": 64}
# PixArt-XL/2 by hand (width 1152, 28 blocks, MLP 4608, T5 4096 -> 1152): per block the biases of the 2 x 4
# attention projections and the MLP's two linears; the top level's patch embedding, output (2*2*8), shared
# adaLN projection (6 x 1152), caption projection (2 x 1152) and timestep embedder (2 x 1152).
BLOCK_BIASES = 8 * 1152 + 4608 + 1152
BIASES = 28 * BLOCK_BIASES + 1152 + 32 + 6 * 1152 + 2 * 1152  # all but the timestep embedder's
TIMESTEP_BIASES = 2 * 1152
TABLES = 28 * 6 * 1152 + 2 * 1152  # every block's scale_shift_table and the final one
GAMMA = 14 * 3 * 1152  # the first half of the blocks, three branches each
LORA_R8 = 28 * 8 * 8 * (1152 + 1152)  # to_q, to_k, to_v, to_out.0 of both attentions, rank 8
XL_TOTAL = 610_856_096


def x_t_c(seed=0, batch=2, text_width=32, tokens=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    text = {
        "prompt_embeds": torch.randn(batch, tokens, text_width, generator=g),
        "prompt_attention_mask": torch.tensor([[1] * tokens, [1, 1, 1, 0, 0]][:batch]),
    }
    return x, torch.tensor([10, 900][:batch]), text


def run(model, seed=0):
    x, t, text = x_t_c(seed)
    with torch.no_grad():
        return PIXART.forward(model, None)(x, t, text)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return make_tiny_pixart(tmp_path_factory.mktemp("pixart") / "pipe")


# -- counts on the real configuration, on the meta device --------------------------------------------------


@pytest.mark.parametrize(
    "method, expected",
    [
        ("difffit", BIASES + TABLES + GAMMA),
        ("bitfit", BIASES + TIMESTEP_BIASES + TABLES),
        ("full", XL_TOTAL),
        ("lora", LORA_R8),
    ],
)
def test_counts_on_the_real_pixart_alpha_xl2_config(method, expected):
    report = describe_method(XL512, method, family=PIXART)
    assert report["trainable_params"] == expected
    assert report["total_params"] == XL_TOTAL + (GAMMA if method == "difffit" else 0) + (
        LORA_R8 if method == "lora" else 0
    )
    assert "num_classes" not in report and report["paper_trainable_params"] is None
    if method == "difffit":
        assert report["gamma_blocks"] == list(range(14))
        assert report["trainable_groups"] == {
            "biases": BIASES,
            "gamma": GAMMA,
            "modulation": TABLES,
            "norms": 0,
            "other": 0,
        }
        assert 0.1 < report["trainable_percent"] < 0.12  # about 0.1% of the model, as the issue promises


def test_1024_model_keeps_its_resolution_and_aspect_embedders_frozen():
    with torch.device("meta"):
        model = PIXART.empty_model({**XL2_CONFIG, "sample_size": 128, "use_additional_conditions": True})
        prepare_model(model, "difffit")
    trained = trainable_parameters(model)
    assert not any(name.startswith("adaln_single.emb.") for name in trained)
    assert "adaln_single.linear.bias" in trained and "caption_projection.linear_1.bias" in trained


def test_dit_only_methods_and_classes_are_refused():
    for method in ("vpt-deep", "adapter-parallel", "adapter-sequential"):
        with pytest.raises(DiffFitError, match="not available on PixArt bases; they support full, bitfit"):
            describe_method(XL512, method, family=PIXART)
    with pytest.raises(DiffFitError, match="Unknown --lora-targets entry 'qkv' for PixArt"):
        describe_method(XL512, "lora", settings=MethodSettings(lora_targets=("qkv",)), family=PIXART)


# -- gamma: untrained = base, placement, folding --------------------------------------------------------


@pytest.mark.parametrize("method", ["difffit", "bitfit", "full", "lora"])
def test_an_untrained_adapter_is_the_base_bit_for_bit(method):
    base, adapted = make_tiny_transformer(), make_tiny_transformer()
    prepare_model(adapted, method, settings=MethodSettings(rank=2))
    assert torch.equal(run(adapted), run(base))


def test_gamma_sits_on_the_three_branch_outputs_of_the_first_half():
    model = make_tiny_transformer(layers=4)
    keys = set(model.state_dict())
    weight = model.transformer_blocks[0].attn1.to_out[0].weight
    prepare_model(model, "difffit")
    assert PIXART.gamma_blocks(model) == [0, 1]
    gammas = sorted(name for name in trainable_parameters(model) if ".gamma_" in name)
    assert gammas == [
        f"transformer_blocks.{i}.{path}.gamma_"
        for i in (0, 1)
        for path in ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")
    ]
    # Shared, not copied: the projection keeps diffusers' parameter names and objects.
    block = model.transformer_blocks[0]
    assert isinstance(block.attn1.to_out[0], ScaledLinear) and block.attn1.to_out[0].weight is weight
    assert set(model.state_dict()) - keys == {name for name in gammas}
    prepare_model(
        make_tiny_transformer(), "difffit", gamma_blocks=[3], settings=MethodSettings(gamma_placement="branch+attn")
    )


@pytest.mark.parametrize("placement", ["branch", "branch+attn"])
def test_gamma_folds_into_the_output_projections(placement):
    model = make_tiny_transformer()
    keys = set(model.state_dict())
    prepare_model(model, "difffit", gamma_blocks=[0, 3], settings=MethodSettings(gamma_placement=placement))
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.2)
    expected = run(model)
    PIXART.fold_gamma(model)
    assert PIXART.gamma_blocks(model) == [] and not any(isinstance(m, ScaledLinear) for m in model.modules())
    assert set(model.state_dict()) == keys  # a stock diffusers transformer again
    torch.testing.assert_close(run(model), expected, atol=1e-5, rtol=1e-5)


def test_lora_targets_both_attentions_and_folds():
    model = make_tiny_transformer()
    prepare_model(model, "lora", settings=MethodSettings(rank=2))
    names = {n.rsplit(".lora_", 1)[0] for n in trainable_parameters(model)}
    assert names == {
        f"transformer_blocks.{i}.attn{a}.{p}"
        for i in range(4)
        for a in (1, 2)
        for p in ("to_q", "to_k", "to_v", "to_out.0")
    }
    assert count_groups(model)["lora"] == 4 * 8 * 2 * (16 + 16)  # 4 blocks x 8 linears 16 -> 16, rank 2
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.2)
    expected = run(model)
    fold_lora(model)
    torch.testing.assert_close(run(model), expected, atol=1e-5, rtol=1e-5)


# -- bases ---------------------------------------------------------------------------------------------------


def test_a_pipeline_folder_loads_as_pixart(pipeline_dir):
    base = load_base(str(pipeline_dir))
    assert family_of(base) is PIXART and resolve_base(str(pipeline_dir)).family is PIXART
    assert base.pipeline == "PixArtAlphaPipeline" and base.max_text_tokens == 120
    assert base.resolution == 16 and len(base.fingerprint) == 16
    assert load_base(str(pipeline_dir)).fingerprint == base.fingerprint
    report = describe_source(str(pipeline_dir), method="difffit")
    assert report["family"] == "pixart" and report["architecture"] == "PixArt-d4-w16/2"
    assert report["trainable_groups"]["gamma"] == 2 * 3 * 16 and report["gamma_blocks"] == [0, 1]


def test_sigma_reads_300_tokens(tmp_path):
    base = load_base(str(make_tiny_pixart(tmp_path / "sigma", pipeline="PixArtSigmaPipeline")))
    assert base.pipeline == "PixArtSigmaPipeline" and base.max_text_tokens == 300


def test_info_on_an_alias_downloads_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    report = describe_source("PixArt-alpha-512", method="difffit")
    assert report["family"] == "pixart" and report["total_params"] == XL_TOTAL and report["resolution"] == 512
    assert report["trainable_params"] == BIASES + TABLES + GAMMA and report["fingerprint"] is None
    assert not (tmp_path / "hf" / "hub").exists() or not any((tmp_path / "hf" / "hub").rglob("*.safetensors"))
    with pytest.raises(DiffFitError, match="--num-classes applies to class-conditional bases"):
        describe_source("PixArt-alpha-512", method="difffit", num_classes=10)


def test_unknown_families_and_lone_transformers_are_refused(tmp_path, pipeline_dir):
    other = tmp_path / "hunyuan"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanDiTPipeline"}))
    with pytest.raises(DiffFitError, match="HunyuanDiTPipeline, which difffit does not adapt; it supports DiT"):
        load_base(str(other))
    with pytest.raises(DiffFitError, match="PixArt transformer alone"):
        load_base(str(pipeline_dir / "transformer"))


def test_a_folder_without_its_text_encoder_is_named(tmp_path):
    import shutil

    folder = make_tiny_pixart(tmp_path / "pipe")
    shutil.rmtree(folder / "text_encoder")
    base = load_base(str(folder))
    with pytest.raises(DiffFitError, match="has no text_encoder"):
        base.components.path("text_encoder", "the text encoder")


# -- adapter files ---------------------------------------------------------------------------------------------


def trained_adapter(pipeline_dir, path, method="difffit", dtype="fp32"):
    base = load_base(str(pipeline_dir))
    model = base.model
    base_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    prepare_model(model, method, settings=MethodSettings(rank=2))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    meta = make_meta(base, model, method, settings=MethodSettings(rank=2), training={"steps": 1})
    save_adapter(path, model, base_state, meta, dtype)
    return run(model), meta


@pytest.mark.parametrize("method", ["difffit", "lora", "bitfit"])
def test_adapter_file_records_the_family_and_swaps_exactly(pipeline_dir, tmp_path, method):
    expected, meta = trained_adapter(pipeline_dir, tmp_path / "a.safetensors", method)
    tensors, read = read_adapter(tmp_path / "a.safetensors")
    assert read.family == "pixart" and read.architecture == "PixArt-d4-w16/2" and read.num_classes is None
    base = load_base(str(pipeline_dir))
    before = run(base.model)
    swapper = AdapterSwapper(base)
    swapper.apply(tensors, read)
    assert torch.equal(run(base.model), expected)  # fp32 values: the trained model exactly
    swapper.restore()
    assert torch.equal(run(base.model), before) and not any(isinstance(m, ScaledLinear) for m in base.model.modules())
    # Folding an applied adapter (what merge does) gives its outputs; folding gamma leaves the base's own
    # tensors alone (peft's LoRA merge adds into the base weight in place: merge needs nothing after it).
    swapper.apply(tensors, read)
    fold_lora(base.model)
    PIXART.fold_gamma(base.model)
    torch.testing.assert_close(run(base.model), expected, atol=1e-5, rtol=1e-5)
    swapper.restore()
    if method != "lora":
        assert torch.equal(run(base.model), before)
    loaded, _ = load_source(str(tmp_path / "a.safetensors"))
    assert torch.equal(run(loaded.model), expected)
    report = describe_source(str(tmp_path / "a.safetensors"))
    assert report["family"] == "pixart" and report["method"] == method and "num_classes" not in report


def test_adapters_apply_only_to_their_own_family(pipeline_dir, tmp_path, tiny_base_file):
    from difffit.engine.methods.sources import load_adapter_base

    trained_adapter(pipeline_dir, tmp_path / "pixart.safetensors")
    with pytest.raises(DiffFitError, match="is a PixArt adapter, and .* is a DiT base"):
        load_source(str(tmp_path / "pixart.safetensors"), base=str(tiny_base_file))
    dit_base = load_base(str(tiny_base_file))
    dit_model = dit_base.model
    prepare_model(dit_model, "difffit")
    save_adapter(
        tmp_path / "dit.safetensors",
        dit_model,
        {n: p.detach().clone() for n, p in dit_model.named_parameters()},
        make_meta(dit_base, dit_model, "difffit"),
    )
    _, dit_meta = read_adapter(tmp_path / "dit.safetensors")
    with pytest.raises(DiffFitError, match="is a DiT adapter, and .* is a PixArt base"):
        load_adapter_base(tmp_path / "dit.safetensors", dit_meta, base=str(pipeline_dir))


def test_the_1024_models_micro_conditions_are_the_pipelines():
    """The α 1024-MS model also reads the image size: (height, width) in pixels and height / width, as its
    pipeline passes them. 48 wide: the size embedders split the width in three."""
    from types import SimpleNamespace

    model = make_tiny_transformer(
        num_attention_heads=3, attention_head_dim=16, cross_attention_dim=48, use_additional_conditions=True
    )
    x, t, text = x_t_c()
    x = torch.nn.functional.pad(x, (0, 4))  # 8 x 12 latents: 16 x 24 px with a VAE of factor 2
    with torch.no_grad():
        ours = PIXART.forward(model, SimpleNamespace(vae_factor=2))(x, t, text)
        theirs = model(
            x,
            encoder_hidden_states=text["prompt_embeds"],
            encoder_attention_mask=text["prompt_attention_mask"],
            timestep=t,
            added_cond_kwargs={
                "resolution": torch.tensor([[16.0, 24.0]] * 2),
                "aspect_ratio": torch.tensor([[16 / 24]] * 2),
            },
            return_dict=False,
        )[0]
    assert torch.equal(ours, theirs)
