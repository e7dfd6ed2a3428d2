"""DiffFit on a tiny PixArt pipeline from captioned images: learning from the captions, exact resume, the
text-embedding cache (hit, damaged), the text encoder freed before training, previews by prompt, and the
bad inputs that stop a run before anything is written."""

from __future__ import annotations

import functools
import gc
import json
import weakref

import numpy as np
import pytest
import torch
from t2i_fixtures import make_captioned_data, make_tiny_pixart, t2i_fit_config

from difffit.engine.data.batches import Captions, StepDraws
from difffit.engine.data.text_cache import text_embeddings
from difffit.engine.errors import DiffFitError
from difffit.engine.methods.sources import load_source
from difffit.engine.models.families import PIXART, load_base
from difffit.engine.training import train
from difffit.engine.training.config import FitConfig
from difffit.engine.training.train import fit


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return make_tiny_pixart(tmp_path_factory.mktemp("pixart") / "pipe")


@pytest.fixture
def data(tmp_path):
    return make_captioned_data(tmp_path / "data")


@pytest.fixture
def conf(tmp_path, data, pipeline_dir):
    return functools.partial(t2i_fit_config, data, pipeline_dir, tmp_path)


def fixed_loss(source, captions: list[str], latents: torch.Tensor) -> float:
    """The hybrid loss of `latents` under `captions` at fixed timesteps and noise (no caption dropout)."""
    base, _ = load_source(str(source))
    encode = PIXART.prompt_encoder(base, "cpu", base.max_text_tokens)
    text = text_embeddings(captions, encode, key="", cache_dir=None, progress=False)
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(50, 950, len(latents)).long()
    noise = torch.randn(latents.shape, generator=g)
    forward = PIXART.forward(base.model.eval(), base)
    with torch.no_grad():
        losses = PIXART.diffusion(base).training_losses(
            lambda x, s: forward(x, s, text.take(torch.arange(len(x)))), latents, t, noise
        )
    return losses["loss"].mean().item()


def training_latents(data, base) -> tuple[torch.Tensor, list[str], list[str]]:
    """The data's latents (means), their captions, and the captions with red and blue swapped."""
    from difffit.engine.data.images import ImageDataset, scan_image_folder
    from difffit.engine.data.latents import encode_distribution

    folder = scan_image_folder(data)
    dataset = ImageDataset(folder, base.resolution)
    pixels = torch.stack([dataset[i][0] for i in range(len(folder))])
    captions = [f"a {p.stem.split('-')[0]} square" for p in folder.files]
    swapped = [c.replace("red", "x").replace("blue", "red").replace("x", "blue") for c in captions]
    return encode_distribution(base.vae(), pixels)[:, 0], captions, swapped


def test_difffit_loss_falls_on_captioned_data(conf, data, pipeline_dir):
    result = fit(conf(steps=80, batch_size=8, lr=2e-2, ema=False), progress=False)
    losses = [json.loads(line)["loss"] for line in (result.out_dir / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 80 and np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    latents, captions, _ = training_latents(data, load_base(str(pipeline_dir)))
    # On the images themselves, at fixed noise, the adapter beats the base.
    assert fixed_loss(result.adapter, captions, latents) < 0.8 * fixed_loss(pipeline_dir, captions, latents)


def test_each_image_trains_with_its_own_caption(conf, monkeypatch):
    """The caption embeddings of a micro-batch are those of the very images whose latents it holds (the
    same data-order indices), through the on-disk cache; the random VAE's latents are too noisy to show it
    by training, so the batch is checked directly."""
    seen = {}
    loop = train.train_loop

    def spy(run, *args, **kwargs):
        batches = run.batches
        index = batches.order.take_batch(batches.split, 3, 0)
        _, text = batches.micro_batch(3, 0, torch.Generator().manual_seed(0))
        seen.update(index=index, text=text, folder=run.folder, embeddings=batches.conditions.embeddings)
        return loop(run, *args, **kwargs)

    monkeypatch.setattr(train, "train_loop", spy)
    fit(conf(steps=1, batch_size=8, caption_dropout=0.0), progress=False)
    folder, embeddings = seen["folder"], seen["embeddings"]
    assert len(set(seen["index"].tolist())) > 1
    for row, i in enumerate(seen["index"].tolist()):
        caption = folder.captions[i]
        assert caption == f"a {folder.files[i].stem.split('-')[0]} square"
        for name, tensor in embeddings.of(caption).items():
            assert torch.equal(seen["text"][name][row], tensor[0])


def test_resume_equals_an_uninterrupted_run(conf, tmp_path):
    from safetensors.torch import load_file

    full = fit(conf(steps=8, save_every=4, out=str(tmp_path / "full")), progress=False)
    fit(conf(steps=4, save_every=4, out=str(tmp_path / "half")), progress=False)
    resumed = fit(conf(steps=8, save_every=4, out=str(tmp_path / "half"), resume=True), progress=False)
    assert resumed.start_step == 4 and resumed.step == 8
    a, b = load_file(str(full.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [
        [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
        for out in (full.out_dir, resumed.out_dir)
    ]
    assert logs[0] == logs[1]


def test_the_text_cache_is_hit_on_the_second_run_and_rebuilt_when_damaged(conf, tmp_path, monkeypatch, capsys):
    from transformers import T5EncoderModel

    first = fit(conf(steps=2, out=str(tmp_path / "one")), progress=False)
    loads = []
    original = T5EncoderModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(T5EncoderModel, "from_pretrained", classmethod(counting))
    second = fit(conf(steps=2, out=str(tmp_path / "two")), progress=False)
    assert loads == []  # every caption came from the cache: the encoder was not even loaded
    shards = [p for p in tmp_path.joinpath("cache", "text").rglob("*.npy")]
    assert shards
    with open(shards[0], "r+b") as f:  # flip bytes inside the embeddings
        f.seek(-16, 2)
        f.write(b"\xff" * 16)
    third = fit(conf(steps=2, out=str(tmp_path / "three")), progress=False)
    assert len(loads) == 1 and "damaged" in capsys.readouterr().err
    a, b = (json.loads((r.out_dir / "log.jsonl").read_text().splitlines()[0])["loss"] for r in (first, third))
    assert a == b and second.step == 2


def test_the_text_encoder_is_freed_before_the_first_step(conf, monkeypatch):
    from transformers import T5EncoderModel

    encoders = []
    original = T5EncoderModel.from_pretrained.__func__

    def remember(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        encoders.append(weakref.ref(model))
        return model

    loop = train.train_loop

    def checked_loop(run, *args, **kwargs):
        gc.collect()
        assert encoders and all(ref() is None for ref in encoders)
        return loop(run, *args, **kwargs)

    monkeypatch.setattr(T5EncoderModel, "from_pretrained", classmethod(remember))
    monkeypatch.setattr(train, "train_loop", checked_loop)
    fit(conf(steps=1), progress=False)


def test_previews_show_the_validation_prompts_at_fixed_seeds(conf, tmp_path):
    from PIL import Image

    prompts = ["a red square", "a blue square", "a bowl of ramen, studio light"]
    configs = [conf(steps=2, sample_every=2, validation_prompts=prompts, out=str(tmp_path / f"r{i}")) for i in range(2)]
    runs = [fit(config, progress=False) for config in configs]
    grids = [np.asarray(Image.open(r.out_dir / "samples" / "step-0000000.png")) for r in runs]
    assert grids[0].shape == (48, 48, 3)  # 8 images of 16 px (the 3 prompts in turn) in a 3 x 3 grid
    assert np.array_equal(grids[0], grids[1])  # step 0 is the base at fixed seeds
    assert (runs[0].out_dir / "samples" / "step-0000002.png").exists()
    from difffit.engine.methods.adapter import read_adapter_meta

    meta = read_adapter_meta(runs[0].adapter)
    assert meta.family == "pixart" and meta.training["validation_prompts"] == prompts
    assert meta.training["caption_dropout"] == 0.1 and meta.training["max_text_tokens"] == 120
    assert configs[0].caption_dropout is None  # the family's default is the run's; the caller's config is its own


def test_previews_without_caption_dropout_still_guide_with_the_empty_caption(conf):
    """--caption-dropout 0 trains on no empty caption, but the previews' guidance needs its embedding."""
    result = fit(conf(steps=1, sample_every=1, caption_dropout=0.0), progress=False)
    assert (result.out_dir / "samples" / "step-0000000.png").is_file()


def test_an_adapter_samples_with_the_token_count_it_trained_with(conf, data):
    result = fit(conf(steps=1, max_text_tokens=6), progress=False)
    base, meta = load_source(str(result.adapter))
    assert meta.training["max_text_tokens"] == 6 and base.max_text_tokens == 6
    assert load_base(conf().base).max_text_tokens == 120  # the base alone: the pipeline's own


def test_caption_dropout_uses_the_empty_caption_at_the_rate_asked():
    captions = [f"caption {i}" for i in range(4)]

    def encode(texts):
        return {
            "prompt_embeds": torch.tensor([[float(len(t))] for t in texts]).unsqueeze(-1),
            "prompt_attention_mask": torch.ones(len(texts), 1),
        }

    embeddings = text_embeddings(captions * 250, encode, key="k", cache_dir=None, progress=False, extra=[""])
    conditions = Captions(embeddings, 0.3)
    drop = StepDraws.draw(torch.Generator().manual_seed(1), 1000, (1,), conditions.dropout).drop
    rows = conditions.take(torch.arange(1000), drop)["prompt_embeds"].flatten()
    assert set(rows.tolist()) == {0.0, 9.0} and 0.25 < (rows == 0).float().mean() < 0.35
    assert torch.equal(rows == 0, drop)
    again = StepDraws.draw(torch.Generator().manual_seed(1), 1000, (1,), conditions.dropout).drop
    assert torch.equal(drop, again)  # a function of the step's generator: resume draws the same


# -- bad input: one sentence, and nothing in --out ---------------------------------------------------------


def refused(config, match):
    out = config.out_dir()
    with pytest.raises(DiffFitError, match=match):
        fit(config, progress=False)
    assert not out.exists()


def test_missing_and_unreadable_captions_stop_the_run(conf, data):
    (data / "red-0.txt").unlink()
    refused(conf(), "1 of 12 images in .* have no caption: red-0.png")
    (data / "red-0.txt").write_bytes(b"a r\xe9d square")
    refused(conf(), "red-0.txt is not UTF-8")


def test_metadata_naming_missing_files_stops_the_run(conf, data):
    for txt in data.glob("*.txt"):
        txt.unlink()
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "a cat"}) + "\n")
    refused(conf(), "gone.png")


def test_a_base_folder_without_its_text_encoder_stops_the_run(conf, tmp_path):
    import shutil

    folder = make_tiny_pixart(tmp_path / "broken")
    shutil.rmtree(folder / "text_encoder")
    refused(conf(base=str(folder)), "has no text_encoder")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"method": "vpt-deep"}, "--method vpt-deep is not available on PixArt bases"),
        ({"num_heads": 2}, "--num-heads applies to class-conditional"),
        ({"resolution": 20}, "--resolution 20 is not a multiple of 8 px"),
        ({"resolution": 32, "pos_embed": "trick"}, "upscale-res moves DiT's fixed positional grid"),
        ({"vae": "identity"}, "--vae applies to class-conditional"),
    ],
)
def test_options_that_do_not_apply_to_pixart(conf, options, match):
    refused(conf(**options), match)


def test_caption_options_on_a_dit_base_are_refused(tmp_path, toy_data, tiny_base_file, tiny_vae_dir):
    config = FitConfig(
        data=str(toy_data),
        base=str(tiny_base_file),
        vae=str(tiny_vae_dir),
        steps=1,
        out=str(tmp_path / "run"),
        caption_template="a photo of {class}",
    )
    refused(config, "--caption-template applies to text-to-image bases")
