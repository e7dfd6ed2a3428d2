"""The rectified-flow families (SD3/3.5, FLUX.1) as families: what each method trains (on the real published
configurations, on the meta device), gamma placement and folding, LoRA, loading pipelines and aliases, the
flow-matching loss against diffusers' scheduler, and refusing what does not apply. Tiny pipelines are built
in the test; nothing is downloaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from t2i_fixtures import (
    FLOW_TEXT_WIDTH,
    make_tiny_flux,
    make_tiny_flux_transformer,
    make_tiny_sd3,
    make_tiny_sd3_transformer,
)

from difffit.engine.errors import DiffFitError
from difffit.engine.methods.adapter import AdapterSwapper, make_meta, read_adapter, save_adapter
from difffit.engine.methods.baselines import MethodSettings, fold_lora
from difffit.engine.methods.sources import describe_source, load_source
from difffit.engine.methods.trainable import count_groups, describe_method, prepare_model, trainable_parameters
from difffit.engine.models.families import FLUX, SD3, family_of, load_base, resolve_base
from difffit.engine.models.families.flux import ALIAS_CONFIGS as FLUX_CONFIGS
from difffit.engine.models.families.sd3 import ALIAS_CONFIGS as SD3_CONFIGS
from difffit.engine.models.flow_matching import FlowMatching
from difffit.engine.models.scaled_linear import ScaledLinear


@dataclass(frozen=True)
class Case:
    family: object
    transformer: object  # (layers=..., seed=...) -> a tiny transformer
    pipeline: object  # (folder) -> a tiny pipeline folder
    pooled: int  # the pooled text width the tiny transformer reads
    one_pass_guidance: float  # a guidance scale at which its pipeline calls the transformer once per step
    packed: bool  # whether its pipeline's latents are packed into tokens (FLUX)


CASES = {
    "sd3": Case(SD3, make_tiny_sd3_transformer, make_tiny_sd3, 32, 1.0, False),
    "flux": Case(FLUX, make_tiny_flux_transformer, make_tiny_flux, 16, 3.5, True),
}


@pytest.fixture(params=list(CASES), scope="module")
def case(request) -> Case:
    return CASES[request.param]


@pytest.fixture(scope="module")
def pipeline_dir(case, tmp_path_factory):
    return case.pipeline(tmp_path_factory.mktemp(case.family.name) / "pipe")


def inputs(case: Case, seed: int = 0, batch: int = 2, tokens: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 8, 8, generator=g)
    text = {
        "prompt_embeds": torch.randn(batch, tokens, FLOW_TEXT_WIDTH, generator=g),
        "pooled_prompt_embeds": torch.randn(batch, case.pooled, generator=g),
    }
    return x, torch.tensor([10.0, 900.0][:batch]), text


def run(case: Case, model, seed: int = 0):
    x, t, text = inputs(case, seed)
    with torch.no_grad():
        return case.family.forward(model, None)(x, t, text)


def perturbed(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.2)
    return model


# -- counts on the real configurations, on the meta device ------------------------------------------------


def sd3_counts(config: dict) -> dict:
    """SD3/3.5 by hand: width w, MLP 4w. Per joint block the biases of q, k, v and the text stream's q, k, v
    (6w), the two attention outputs (2w), both MLPs (2 x 5w), both adaLN projections (2 x 6w); the last block
    has no text attention output or text MLP, and its text adaLN is the continuous one (2w); a dual-attention
    block adds attn2 (4w) and 3w of adaLN. Top level: patch embedding, pooled-text MLP and timestep MLP (w
    each pair), caption projection, the final adaLN (2w) and the output layer (2 x 2 x 16). gamma: 4 or 5
    branches (w each) of the first half; q/k RMSNorms: 4 (+ 2 for attn2) x 64 per block."""
    depth, w = config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]
    dual, rms = set(config["dual_attention_layers"]), config["qk_norm"] == "rms_norm"
    per_block = [(6 + 2 + 10 + 12) * w if i < depth - 1 else (6 + 1 + 5 + 6 + 2) * w for i in range(depth)]
    per_block = [n + (7 * w if i in dual else 0) for i, n in enumerate(per_block)]
    biases = sum(per_block) + w + 2 * w + w + 2 * w + 64  # the timestep embedder's 2w are extra
    gamma = sum((4 + (i in dual)) * w for i in range(depth // 2))
    norms = sum((4 + 2 * (i in dual)) * 64 for i in range(depth)) if rms else 0
    attention = [8 if i < depth - 1 else 7 for i in range(depth)]  # the last block: no to_add_out
    lora = sum((n + 4 * (i in dual)) * 8 * 2 * w for i, n in enumerate(attention))
    return {"biases": biases, "timestep": 2 * w, "gamma": gamma, "norms": norms, "lora": lora, "depth": depth}


def flux_counts(config: dict) -> dict:
    """FLUX.1 by hand: width w, MLP 4w. Per joint block the biases of both adaLN projections (2 x 6w), q, k, v
    of both streams (6w), both attention outputs (2w) and both MLPs (2 x 5w); per single block its adaLN
    (3w), q, k, v (3w), the MLP input (4w) and the fused output (w). Top level: image and text input
    projections (w each), the pooled-text MLP (2w), the final adaLN (2w), the output layer (64); the
    timestep MLP (2w) and FLUX.1-dev's guidance MLP (2w) are frozen. gamma: the first half of the 57 blocks
    = the 19 joint (4 branches, w each) and 9 single (proj_out, w). q/k RMSNorms: 4 x 128 per joint block,
    2 x 128 per single block. LoRA (rank 8, every w -> w attention projection): 8 per joint, 3 per single."""
    joint, single, w = config["num_layers"], config["num_single_layers"], config["num_attention_heads"] * 128
    embedders = 2 * w * (1 + config["guidance_embeds"])
    depth = joint + single
    return {
        "biases": joint * 30 * w + single * 11 * w + 6 * w + 64,
        "timestep": embedders,
        "gamma": 4 * w * joint + w * (depth // 2 - joint),
        "norms": (4 * joint + 2 * single) * 128,
        "lora": (8 * joint + 3 * single) * 8 * 2 * w,
        "depth": depth,
    }


REAL = [
    ("sd3", name, SD3_CONFIGS[name], sd3_counts(SD3_CONFIGS[name]), total)
    for name, total in (("SD3-medium", 2_028_328_000), ("SD3.5-medium", 2_243_171_520), ("SD3.5-large", 8_056_627_520))
]
REAL += [
    ("flux", name, FLUX_CONFIGS[name], flux_counts(FLUX_CONFIGS[name]), total)
    for name, total in (("FLUX.1-dev", 11_901_408_320), ("FLUX.1-schnell", 11_891_178_560))
]


@pytest.mark.parametrize("family, name, config, counts, total", REAL, ids=[r[1] for r in REAL])
def test_counts_on_the_real_configurations(family, name, config, counts, total):
    family = CASES[family].family
    difffit = describe_method(config, "difffit", family=family)
    assert difffit["trainable_groups"] == {
        "biases": counts["biases"],
        "gamma": counts["gamma"],
        "modulation": 0,
        "norms": counts["norms"],
        "other": 0,
    }
    assert difffit["total_params"] == total + counts["gamma"]
    assert difffit["gamma_blocks"] == list(range(counts["depth"] // 2))  # the first half, FLUX's in both lists
    assert describe_method(config, "bitfit", family=family)["trainable_params"] == counts["biases"] + counts["timestep"]
    assert describe_method(config, "full", family=family)["trainable_params"] == total
    assert describe_method(config, "lora", family=family)["trainable_params"] == counts["lora"]
    assert 0.02 < difffit["trainable_percent"] < 0.1  # a few hundredths of a percent of a 2-12B model


# -- gamma: untrained = base, placement, folding ------------------------------------------------------------


@pytest.mark.parametrize("method", ["difffit", "bitfit", "full", "lora"])
def test_an_untrained_adapter_is_the_base_bit_for_bit(case, method):
    base, adapted = case.transformer(), case.transformer()
    prepare_model(
        adapted,
        method,
        gamma_blocks=list(range(case.family.depth(adapted))) if method == "difffit" else None,
        settings=MethodSettings(rank=2),
    )
    assert torch.equal(run(case, adapted), run(case, base))


def test_sd3_gamma_sits_on_every_branch_output_of_both_streams():
    model = make_tiny_sd3_transformer(layers=4)
    keys = set(model.state_dict())
    prepare_model(model, "difffit", gamma_blocks=[0, 1, 3])
    gammas = {name.removesuffix(".gamma_") for name in trainable_parameters(model) if ".gamma_" in name}
    both = ("attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2")
    assert gammas == {f"transformer_blocks.{i}.{path}" for i in (0, 1) for path in both} | {
        "transformer_blocks.0.attn2.to_out.0",  # block 0 has SD3.5's second image attention
        "transformer_blocks.3.attn.to_out.0",
        "transformer_blocks.3.ff.net.2",
    }  # the last: no text outputs
    assert set(model.state_dict()) - keys == {f"{name}.gamma_" for name in gammas}
    assert SD3.gamma_blocks(model) == [0, 1, 3]
    trained = trainable_parameters(model)
    assert {"transformer_blocks.0.attn.norm_q.weight", "transformer_blocks.0.attn2.norm_k.weight"} <= set(trained)
    assert not any(name.startswith("time_text_embed.timestep_embedder.") for name in trained)
    assert "time_text_embed.text_embedder.linear_1.bias" in trained and "context_embedder.bias" in trained


def test_flux_gamma_sits_on_both_streams_of_joint_blocks_and_the_fused_output_of_single_blocks():
    """Blocks count joint first, then single; the first half by default; a single block's one gamma is on
    proj_out, which fuses its attention and MLP outputs."""
    model = make_tiny_flux_transformer(layers=3)  # 3 joint + 3 single
    prepare_model(model, "difffit")
    gammas = {name.removesuffix(".gamma_") for name in trainable_parameters(model) if ".gamma_" in name}
    joint = ("attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2")
    assert gammas == {f"transformer_blocks.{i}.{path}" for i in range(3) for path in joint}
    assert FLUX.gamma_blocks(model) == [0, 1, 2]  # the first half of 6
    model = make_tiny_flux_transformer(layers=3)
    prepare_model(model, "difffit", gamma_blocks=[2, 3, 5], settings=MethodSettings(gamma_placement="branch+attn"))
    gammas = {name.removesuffix(".gamma_") for name in trainable_parameters(model) if ".gamma_" in name}
    qkv = ("attn.to_q", "attn.to_k", "attn.to_v")
    assert gammas == (
        {
            f"transformer_blocks.2.{path}"
            for path in (*joint, *qkv, "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
        }
        | {f"single_transformer_blocks.{i}.{path}" for i in (0, 2) for path in ("proj_out", *qkv)}
    )
    assert FLUX.gamma_blocks(model) == [2, 3, 5]
    trained = trainable_parameters(model)
    assert {
        "single_transformer_blocks.0.attn.norm_q.weight",
        "transformer_blocks.0.attn.norm_added_k.weight",
        "single_transformer_blocks.1.proj_mlp.bias",
        "time_text_embed.text_embedder.linear_1.bias",
    } <= set(trained)
    assert not any(
        name.startswith(("time_text_embed.timestep_embedder.", "time_text_embed.guidance_embedder."))
        for name in trained
    )


@pytest.mark.parametrize("placement", ["branch", "branch+attn"])
def test_gamma_folds_into_the_output_projections(case, placement):
    model = case.transformer()
    keys = set(model.state_dict())
    prepare_model(
        model,
        "difffit",
        gamma_blocks=list(range(case.family.depth(model))),
        settings=MethodSettings(gamma_placement=placement),
    )
    expected = run(case, perturbed(model))
    case.family.fold_gamma(model)
    assert case.family.gamma_blocks(model) == [] and not any(isinstance(m, ScaledLinear) for m in model.modules())
    assert set(model.state_dict()) == keys  # a stock diffusers transformer again
    torch.testing.assert_close(run(case, model), expected, atol=1e-5, rtol=1e-5)


def test_lora_targets_the_attention_of_both_streams_and_folds(case):
    model = case.transformer()
    prepare_model(model, "lora", settings=MethodSettings(rank=2))
    names = {n.rsplit(".lora_", 1)[0] for n in trainable_parameters(model)}
    assert {
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.add_k_proj",
        "transformer_blocks.0.attn.to_add_out",
    } <= names
    assert not any(name.endswith(("ff.net.2", "proj_out")) for name in names)
    assert count_groups(model)["lora"] == len(names) * 2 * (16 + 16)  # every target 16 -> 16, rank 2
    expected = run(case, perturbed(model))
    fold_lora(model)
    torch.testing.assert_close(run(case, model), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(DiffFitError, match=f"Unknown --lora-targets entry 'qkv' for {case.family.title}"):
        prepare_model(case.transformer(), "lora", settings=MethodSettings(lora_targets=("qkv",)))


def test_dit_only_methods_are_refused(case):
    with pytest.raises(DiffFitError, match=f"not available on {case.family.title} bases; they support full"):
        prepare_model(case.transformer(), "vpt-deep")


# -- bases ----------------------------------------------------------------------------------------------------


def test_a_pipeline_folder_loads_as_its_family(case, pipeline_dir):
    base = load_base(str(pipeline_dir))
    assert family_of(base) is case.family and resolve_base(str(pipeline_dir)).family is case.family
    assert base.resolution == 16 and len(base.fingerprint) == 16
    report = describe_source(str(pipeline_dir), method="difffit")
    assert report["family"] == case.family.name and report["pipeline"] == base.pipeline
    assert (
        report["trainable_params"]
        == describe_method(case.family.config_of(base.model), "difffit", family=case.family)["trainable_params"]
    )


def test_the_default_text_tokens_are_the_pipelines_capped_by_its_long_text_tokenizer(case, tmp_path):
    """A T5 tokenizer made for fewer tokens than the pipeline's max_sequence_length (the bundled tiny-t2i's 16)
    sets the default; an unset model_max_length (transformers' huge sentinel) leaves the pipeline's own."""
    import json
    import shutil

    folder = case.pipeline(tmp_path / "pipe")
    tokenizer = folder / case.family.kind.long_text_tokenizer / "tokenizer_config.json"
    settings = json.loads(tokenizer.read_text())
    pipeline_tokens = load_base(str(folder)).max_text_tokens
    assert pipeline_tokens in (256, 512) and settings.get("model_max_length", 10**30) > pipeline_tokens
    tokenizer.write_text(json.dumps({**settings, "model_max_length": 24}))
    assert load_base(str(folder)).max_text_tokens == 24
    assert describe_source(str(folder))["max_text_tokens"] == 24  # info reads the config alone, and the same
    shutil.copytree(folder, tmp_path / "long")  # a tokenizer made for more leaves the pipeline's default
    tokenizer = tmp_path / "long" / case.family.kind.long_text_tokenizer / "tokenizer_config.json"
    tokenizer.write_text(json.dumps({**settings, "model_max_length": 4096}))
    assert load_base(str(tmp_path / "long")).max_text_tokens == pipeline_tokens


def test_info_on_an_alias_downloads_nothing(case, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    alias, config = next(iter(case.family.kind.alias_configs.items()))
    report = describe_source(alias, method="difffit")
    assert report["family"] == case.family.name and report["fingerprint"] is None and report["resolution"] == 1024
    assert report["trainable_params"] == describe_method(config, "difffit", family=case.family)["trainable_params"]
    assert not any((tmp_path / "hf").rglob("*.safetensors"))


def test_sd3_takes_images_up_to_its_positional_table_and_flux_any(tmp_path, monkeypatch):
    """SD3's positional table, 192 patches (SD3.5-medium: 384): 3072 px (6144), where buckets and --resolution
    stop; FLUX's rotary positions have no limit."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    sides = {alias: SD3.largest_side(load_base(alias, info=True)) for alias in SD3.kind.alias_configs}
    assert sides == {"SD3-medium": 3072, "SD3.5-medium": 6144, "SD3.5-large": 3072, "SD3.5-large-turbo": 3072}
    assert FLUX.largest_side(load_base("FLUX.1-dev", info=True)) is None
    with pytest.raises(DiffFitError, match="--width 3200 is above 3072 px"):
        SD3.check_sample_size(load_base("SD3.5-large", info=True), 3200, None)


def test_a_gated_repo_is_one_sentence_naming_its_licence_page(case, tmp_path, monkeypatch):
    """At the library boundary: huggingface_hub raises its gated-repo error, as it does for an account that has
    not accepted the licence."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(repo_id, **kwargs):
        raise GatedRepoError(
            f"401 Client Error. Cannot access gated repo for url https://huggingface.co/{repo_id}.",
            response=SimpleNamespace(headers={}, status_code=401, request=None),
        )

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    alias = next(iter(case.family.kind.aliases))
    repo = case.family.kind.aliases[alias].transformer
    with pytest.raises(
        DiffFitError,
        match=f"gated Hub repo .* accept it on its licence page, https://huggingface.co/{repo}, then log in",
    ) as error:
        load_base(alias)
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)


def test_lone_transformers_and_missing_encoders_are_refused(case, pipeline_dir, tmp_path):
    import shutil

    with pytest.raises(DiffFitError, match=f"{case.family.title} transformer alone"):
        load_base(str(pipeline_dir / "transformer"))
    broken = tmp_path / "broken"
    shutil.copytree(pipeline_dir, broken)
    last_encoder = sorted(p.name for p in broken.glob("text_encoder*"))[-1]
    shutil.rmtree(broken / last_encoder)
    with pytest.raises(DiffFitError, match=f"has no {last_encoder}"):
        case.family.check_ready(load_base(str(broken)))


@pytest.mark.parametrize("method", ["difffit", "lora"])
def test_adapter_file_records_the_family_and_swaps_exactly(case, pipeline_dir, tmp_path, method):
    base = load_base(str(pipeline_dir))
    base_state = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    before = run(case, base.model)
    prepare_model(base.model, method, settings=MethodSettings(rank=2))
    # Frozen, as an applied adapter is: peft's LoRA layers take another (equally exact) path for trainable weights.
    expected = run(case, perturbed(base.model).requires_grad_(False))
    meta = make_meta(base, base.model, method, settings=MethodSettings(rank=2), training={"steps": 1})
    save_adapter(tmp_path / "a.safetensors", base.model, base_state, meta, "fp32")
    tensors, read = read_adapter(tmp_path / "a.safetensors")
    assert read.family == case.family.name
    fresh = load_base(str(pipeline_dir))
    swapper = AdapterSwapper(fresh)
    swapper.apply(tensors, read)
    assert torch.equal(run(case, fresh.model), expected)
    swapper.restore()
    assert torch.equal(run(case, fresh.model), before)
    loaded, _ = load_source(str(tmp_path / "a.safetensors"))
    assert torch.equal(run(case, loaded.model), expected)


def test_adapters_apply_only_to_their_own_family(case, pipeline_dir, tmp_path):
    from t2i_fixtures import make_tiny_pixart

    base = load_base(str(pipeline_dir))
    state = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    prepare_model(base.model, "difffit")
    save_adapter(tmp_path / "a.safetensors", base.model, state, make_meta(base, base.model, "difffit"))
    pixart = make_tiny_pixart(tmp_path / "pixart")
    with pytest.raises(DiffFitError, match=f"is a {case.family.title} adapter, and .* is a PixArt base"):
        load_source(str(tmp_path / "a.safetensors"), base=str(pixart))


# -- the flow-matching loss ---------------------------------------------------------------------------------


def test_the_flow_loss_is_rectified_flow_on_the_schedulers_sigmas():
    """x_t = (1 - sigma) x0 + sigma noise at one of the scheduler's (shifted) training sigmas, the model called
    at sigma * 1000, and the loss the MSE against noise - x0: a model that predicts exactly that scores 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    flow = FlowMatching(dict(config), lambda x0: 16)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 16, 4, 4, generator=g)
    u, noise = flow.draw(g, 4, (16, 4, 4))
    assert u.shape == (4,) and ((u > 0) & (u < 1)).all() and noise.shape == x0.shape
    sigma = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas[(u * 1000).long()]
    seen = {}

    def velocity(xt, t):
        seen.update(xt=xt, t=t)
        s = (t / 1000).view(-1, 1, 1, 1)
        return (xt - x0) / s  # noise - x0, recovered from x_t

    losses = flow.training_losses(velocity, x0, u, noise)
    torch.testing.assert_close(seen["t"], sigma * 1000)
    torch.testing.assert_close(seen["xt"], (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise)
    assert losses["loss"].max() < 1e-8 and torch.equal(losses["vb"], torch.zeros(4))
    assert torch.allclose(
        flow.training_losses(lambda xt, t: torch.zeros_like(xt), x0, u, noise)["loss"],
        (noise - x0).pow(2).mean(dim=(1, 2, 3)),
    )


def test_dynamic_shifting_shifts_by_the_images_tokens_as_the_pipeline_does():
    """FLUX.1-dev's scheduler shifts by resolution: a training sigma is what the pipeline's set_timesteps(mu)
    makes of the same unshifted sigma for an image of that many tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = dict(
        FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15).config
    )
    for tokens in (256, 1024, 4096):
        flow = FlowMatching(config, lambda x0, n=tokens: n)
        u = torch.tensor([0.25, 0.5, 0.9])
        plain = FlowMatchEulerDiscreteScheduler(**config).sigmas[(u * 1000).long()]
        reference = FlowMatchEulerDiscreteScheduler(**config)
        reference.set_timesteps(sigmas=plain.tolist(), mu=calculate_shift(tokens))
        torch.testing.assert_close(flow.sigmas(u, torch.zeros(1)), reference.sigmas[:3])
    assert not torch.equal(
        FlowMatching(config, lambda x0: 256).sigmas(u, None), FlowMatching(config, lambda x0: 4096).sigmas(u, None)
    )


@pytest.mark.parametrize("sampling", ["logit_normal", "uniform", "mode"])
def test_timestep_sampling_uses_the_diffusers_densities(sampling):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    flow = FlowMatching(dict(FlowMatchEulerDiscreteScheduler().config), lambda x0: 16, sampling)
    u, _ = flow.draw(torch.Generator().manual_seed(5), 2000, (1,))
    expected = compute_density_for_timestep_sampling(
        sampling, 2000, 0.0, 1.0, 1.29, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(u, expected)
    middle = ((u > 0.25) & (u < 0.75)).float().mean()  # uniform: half; the other two favour the middle
    assert 0.45 < middle < 0.55 if sampling == "uniform" else middle > 0.6
    with pytest.raises(ValueError):
        flow.mse_weights(snr_gamma=5.0)


def test_the_adapter_json_config_compares_equal_to_the_models():
    model = make_tiny_sd3_transformer()
    config = SD3.config_of(model)
    assert json.loads(json.dumps(config)) == config and config["dual_attention_layers"] == [0]


def test_the_training_forward_is_the_pipelines_call(case, pipeline_dir):
    """One Euler step of the pipeline from given latents at sigma 1 (t = 1000) moves them by minus the
    transformer's output: that output must be the family's forward at t = 1000 on the same latents and
    embeddings (FLUX: packed 2 x 2 with position ids, timestep / 1000, FLUX.1-dev's guidance 3.5)."""
    from diffusers import DiffusionPipeline

    base = load_base(str(pipeline_dir))
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, transformer=base.model)
    pipe.set_progress_bar_config(disable=True)
    _, _, text = inputs(case, seed=1, batch=1)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    latents = pipe._pack_latents(x, 1, 16, 8, 8) if case.packed else x
    extra = (
        {}
        if case.packed
        else {
            "negative_prompt_embeds": text["prompt_embeds"],
            "negative_pooled_prompt_embeds": text["pooled_prompt_embeds"],
        }
    )
    stepped = pipe(
        prompt_embeds=text["prompt_embeds"],
        pooled_prompt_embeds=text["pooled_prompt_embeds"],
        **extra,
        latents=latents,
        num_inference_steps=1,
        sigmas=[1.0],
        guidance_scale=case.one_pass_guidance,
        height=16,
        width=16,
        output_type="latent",
    ).images
    with torch.no_grad():
        expected = x - case.family.forward(base.model, base)(x, torch.tensor([1000.0]), text)
    if case.packed:
        expected = pipe._pack_latents(expected, 1, 16, 8, 8)
    torch.testing.assert_close(stepped, expected, atol=1e-5, rtol=1e-5)


def test_flux_schnell_kind_trains_without_guidance_and_samples_as_its_card_says(tmp_path):
    """A FLUX base without guidance embedding (schnell's kind): the forward passes no guidance, 256 T5 tokens
    and schnell's card (4 steps, guidance 0) are its defaults; --negative-prompt is one sentence on FLUX."""
    from difffit.engine.evaluation.sample import SamplingOptions

    base = load_base(str(make_tiny_flux(tmp_path / "schnell", guidance_embeds=False)))
    assert base.max_text_tokens == 256 and FLUX.architecture(FLUX.config_of(base.model)) == "FLUX-d2+2-w16"
    resolved = SamplingOptions(cfg_scale=None, scheduler=None).for_base(base)
    assert (resolved.steps, resolved.cfg_scale) == (4, 0.0)
    x, t, text = inputs(CASES["flux"])
    with torch.no_grad():
        assert FLUX.forward(base.model, base)(x, t, text).shape == x.shape
    with pytest.raises(DiffFitError, match="--negative-prompt has nothing to steer on FLUX bases"):
        SamplingOptions(cfg_scale=None, scheduler=None, negative_prompt="blurry").for_base(base)
    assert FLUX.architecture(FLUX_CONFIGS["FLUX.1-schnell"]) == "FLUX.1-schnell"
    assert FLUX.architecture(FLUX_CONFIGS["FLUX.1-dev"]) == "FLUX.1-dev"


def test_flux_shifts_its_training_sigmas_by_resolution_and_sd3_does_not(case, pipeline_dir):
    base = load_base(str(pipeline_dir))
    flow = case.family.diffusion(base)
    u = torch.tensor([0.3, 0.5, 0.7])
    small, large = flow.sigmas(u, torch.zeros(1, 16, 8, 8)), flow.sigmas(u, torch.zeros(1, 16, 64, 64))
    assert torch.equal(small, large) != case.packed  # FLUX.1-dev: more tokens, more noise at the same u
    if case.packed:
        assert (large > small).all()
