"""The family interface itself: a `--base` spec read once into a `BaseSpec` that every loader takes, required
members declared (never stubs), optional capabilities absent from the families without them, and gamma's
placement as data for DiT as for the text families. Tiny models only; nothing is downloaded."""

import inspect
import json
import shutil

import pytest
import torch
from t2i_fixtures import make_tiny_pixart

from difffit.engine.errors import DiffFitError
from difffit.engine.models import families
from difffit.engine.models.dit import DiT, DiTConfig
from difffit.engine.models.families import DIT, FAMILIES, PIXART, base_architecture, load_base, resolve_base
from difffit.engine.models.family import BaseSpec, Family, FreeSize, TextConditioning
from difffit.engine.models.gamma import GammaSite

TEXT_ONLY = ("prompt_encoder", "text_key", "sample_images", "text_token_limit", "caption_dropout", "pipeline_call")
FREE_SIZE_ONLY = ("size_multiple", "largest_side", "check_side")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return make_tiny_pixart(tmp_path_factory.mktemp("pixart") / "pipe")


def test_no_family_member_is_a_stub():
    for family in FAMILIES.values():
        for cls in type(family).__mro__:
            for name, member in vars(cls).items():
                if inspect.isfunction(member):
                    assert "NotImplementedError" not in inspect.getsource(member), f"{cls.__name__}.{name}"
    assert inspect.isabstract(Family) and "load" in Family.__abstractmethods__


def test_optional_capabilities_are_absent_where_a_family_lacks_them():
    assert not isinstance(DIT, TextConditioning | FreeSize) and DIT.fixed_size
    assert not any(hasattr(DIT, name) for name in TEXT_ONLY + FREE_SIZE_ONLY)
    for family in FAMILIES.values():
        if family is not DIT:
            assert isinstance(family, TextConditioning) and isinstance(family, FreeSize) and not family.fixed_size
            assert family.conditioning == "text"


def test_a_base_spec_is_resolved_once_and_loaded_from_that(pipeline_dir, tiny_base_file, monkeypatch):
    pixart, dit = resolve_base(str(pipeline_dir)), resolve_base(str(tiny_base_file))
    assert (pixart.family, pixart.source, pixart.path) == (PIXART, "folder", pipeline_dir)
    assert (dit.family, dit.source) == (DIT, "file")
    assert resolve_base("tiny").source == "bundled" and resolve_base("random:DiT-S/2").source == "random"
    assert resolve_base("DiT-XL/2-256") == BaseSpec("DiT-XL/2-256", DIT, "alias", repo_id="facebook/DiT-XL-2-256")
    monkeypatch.setattr(families, "resolve_base", lambda *a, **k: pytest.fail("the spec was read again"))
    assert load_base(pixart).spec == str(pipeline_dir) and load_base(dit).fingerprint


def test_a_hub_id_is_looked_up_once(pipeline_dir, tmp_path, monkeypatch):
    snapshot = shutil.copytree(pipeline_dir, tmp_path / "snapshot")
    fetched = []

    def hub_snapshot(repo_id, patterns, **where):
        fetched.append((repo_id, tuple(patterns)))
        return snapshot

    monkeypatch.setattr(families, "hub_snapshot", hub_snapshot)
    monkeypatch.setattr("difffit.engine.models.families.pipeline_bases.hub_snapshot", hub_snapshot)
    base = load_base("someone/tiny-pixart")
    assert base.source_format == "hub" and base.hub_id == "someone/tiny-pixart"
    assert sum("model_index.json" in patterns for _, patterns in fetched) == 2  # the family's, then the loader's
    assert base_architecture("someone/tiny-pixart") is None and len(fetched) == 2  # config's check: no network


def test_a_dit_pipeline_with_class_names_is_dit(tmp_path):
    """DiTPipeline keeps id2label in model_index.json, beside its components (the Hub's facebook/DiT-XL-2-256)."""
    index = {
        "_class_name": "DiTPipeline",
        "id2label": {"0": "tench, Tinca tinca"},
        "scheduler": ["diffusers", "DDIMScheduler"],
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert resolve_base(str(tmp_path)) == BaseSpec(str(tmp_path), DIT, "folder", tmp_path)
    with pytest.raises(DiffFitError, match="lists the component vae as 'AutoencoderKL'"):
        (tmp_path / "model_index.json").write_text(json.dumps({**index, "vae": "AutoencoderKL"}))
        resolve_base(str(tmp_path))


def test_dit_gamma_is_data_added_and_folded_by_the_shared_code():
    branch = (GammaSite("attn.proj", "gamma_attn"), GammaSite("mlp.fc2", "gamma_mlp"))
    assert DIT.gamma.sites("blocks", "branch") == branch
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, hidden_size=64, depth=3, num_heads=4, num_classes=4)).eval()
    with torch.no_grad():  # the reference init zeroes the modulation and the final layer: nothing would show
        for p in model.parameters():
            p.normal_(0, 0.1)
    DIT.add_gamma(model, [0, 2], "branch+attn")
    assert DIT.gamma_blocks(model) == model.gamma_blocks == [0, 2] and model.blocks[1].attn.gamma_qkv is None
    assert model.blocks[2].attn.gamma_qkv.shape == (3 * 64,)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.uniform_(0.5, 1.5)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([0, 3])
    with torch.no_grad():
        expected = model(x, t, y)
        DIT.fold_gamma(model)
        assert DIT.gamma_blocks(model) == [] and not any("gamma" in n for n, _ in model.named_parameters())
        torch.testing.assert_close(model(x, t, y), expected, atol=1e-5, rtol=1e-5)


def test_the_config_check_reads_cheap_dit_architectures_only(tiny_base_file):
    assert base_architecture(str(tiny_base_file)).name == load_base(str(tiny_base_file)).config.name
    assert base_architecture("random:DiT-S/2", resolution=64).input_size == 8
    assert base_architecture("random:DiT-Q/2") is None and base_architecture("DiT-XL/2-256") is None
