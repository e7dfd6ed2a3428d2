"""The model against the reference implementation's outputs (fp32, CPU)."""

import pytest
import torch
from conftest import MODEL_ATOL, guidance_atol

from difffit.engine.models.dit import DiT, DiTConfig, config_for, sincos_pos_embed_2d
from difffit.engine.models.families.dit import DIT


def test_forward_matches_reference(golden, golden_model):
    with torch.no_grad():
        out = golden_model(golden["fwd.x"], golden["fwd.t"], golden["fwd.y"])
    torch.testing.assert_close(out, golden["fwd.out"], atol=MODEL_ATOL, rtol=0)


def test_cfg_three_channels_matches_reference(golden, golden_model):
    scale = golden["cfg.scale"].item()
    with torch.no_grad():
        out = golden_model.forward_with_cfg(golden["cfg.x"], golden["cfg.t"], golden["cfg.y"], scale, cfg_channels=3)
    torch.testing.assert_close(out, golden["cfg.out"], atol=guidance_atol(scale), rtol=0)


def test_cfg_all_channels_guides_every_eps_channel(golden, golden_model):
    x, t, y, scale = golden["cfg.x"], golden["cfg.t"], golden["cfg.y"], golden["cfg.scale"].item()
    with torch.no_grad():
        out = golden_model.forward_with_cfg(x, t, y, scale, cfg_channels="all")
        half = x[: len(x) // 2]
        raw = golden_model(torch.cat([half, half]), t, y)
    cond, uncond = raw[:, :4].chunk(2)
    expected = uncond + scale * (cond - uncond)
    torch.testing.assert_close(out[:2, :4], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[2:, :4], expected, atol=1e-6, rtol=0)
    # the first three channels agree with the reference quirk; the fourth differs
    torch.testing.assert_close(out[:, :3], golden["cfg.out"][:, :3], atol=guidance_atol(scale), rtol=0)
    assert (out[:, 3] - golden["cfg.out"][:, 3]).abs().max() > 1e-3
    torch.testing.assert_close(out[:, 4:], golden["cfg.out"][:, 4:], atol=MODEL_ATOL, rtol=0)


def test_positional_embedding_matches_checkpoint(golden):
    cfg = golden["config"]
    pos = sincos_pos_embed_2d(cfg["hidden_size"], cfg["input_size"] // cfg["patch_size"])
    torch.testing.assert_close(pos, golden["state"]["pos_embed"][0], atol=0, rtol=0)


def test_label_dropout_only_in_train_mode(golden_model):
    y = torch.zeros(4096, dtype=torch.long)
    emb = golden_model.y_embedder
    table = emb.embedding_table.weight
    emb.train()
    try:
        torch.manual_seed(0)
        out = emb(y)
    finally:
        emb.eval()
    dropped = (out == table[emb.num_classes]).all(dim=1).float().mean().item()
    assert 0.08 < dropped < 0.12  # class_dropout_prob = 0.1
    assert (emb(y) == table[0]).all()


def test_scale_factors_of_one_change_nothing(golden, golden_model):
    model = DiT(golden_model.config).eval()
    model.load_state_dict(golden_model.state_dict())
    DIT.add_gamma(model, [0, 1], "branch")
    assert model.gamma_blocks == [0, 1]
    with torch.no_grad():
        out = model(golden["fwd.x"], golden["fwd.t"], golden["fwd.y"])
        assert torch.equal(out, golden_model(golden["fwd.x"], golden["fwd.t"], golden["fwd.y"]))
        model.blocks[0].gamma_mlp.fill_(0.5)
        assert not torch.equal(model(golden["fwd.x"], golden["fwd.t"], golden["fwd.y"]), out)


def test_gradient_checkpointing_gives_same_gradients(golden, golden_model):
    def grads(checkpointing: bool):
        model = DiT(golden_model.config)
        model.load_state_dict(golden_model.state_dict())
        model.eval().set_gradient_checkpointing(checkpointing)
        model(golden["fwd.x"], golden["fwd.t"], golden["fwd.y"]).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-B/4", "DiT-L/8", "DiT-XL/2"])
def test_standard_configs(name):
    cfg = config_for(name, input_size=32)
    assert cfg.name == name
    with torch.device("meta"):
        model = DiT(cfg)
    assert model.pos_embed.shape[1] == (32 // cfg.patch_size) ** 2


def test_xl2_parameter_count_matches_reference():
    with torch.device("meta"):
        model = DiT(config_for("DiT-XL/2", input_size=32))
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


def test_unknown_config_is_refused():
    with pytest.raises(ValueError, match="Unknown DiT config"):
        config_for("DiT-M/2")


def test_pos_embed_trick_positions():
    base = sincos_pos_embed_2d(64, 4)
    trick = sincos_pos_embed_2d(64, 8, scale=2.0).reshape(8, 8, 64)
    torch.testing.assert_close(trick[::2, ::2].reshape(16, 64), base, atol=0, rtol=0)
    assert isinstance(DiTConfig().pos_embed_scale, float)
