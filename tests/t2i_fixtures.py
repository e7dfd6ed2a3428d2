"""Tiny text-to-image components built in place (no download): tokenizers trained here, tiny encoders.

`save_tiny_t5(folder)` writes `text_encoder/` (a T5EncoderModel) and `tokenizer/` (a T5 tokenizer
trained with `tokenizers`), the layout of a diffusers pipeline folder; `tiny_clip_tokenizer()` trains
a byte-level BPE wrapped as a CLIP tokenizer; `make_tiny_pixart(folder)` saves a whole tiny PixArt
pipeline (a few-block PixArtTransformer2DModel, the tiny T5, a small VAE and the scheduler the real
pipelines ship) with the pipeline's own save_pretrained, so it loads through the same code path as a
Hub id. Tests import this module; keep it small and importable.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import torch

CORPUS = [
    "a photo of a cat",
    "a photo of a dog",
    "a red bowl of ramen, studio light",
    "a bowl of noodles",
    "a dog on the beach at sunset",
    "a cat sleeping on a sofa",
    "a blue square on a white background",
    "a green circle",
    "an orange triangle",
    "a portrait of an astronaut riding a horse",
    "hot dogs",
    "a watercolor painting of mountains",
    "a city street at night, neon lights, rain",
]


def tiny_t5_tokenizer(corpus: list[str] = CORPUS, vocab_size: int = 200):
    """A T5 tokenizer (unigram; <pad> 0, </s> 1, <unk> 2, as T5's) trained on `corpus`."""
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import T5TokenizerFast

    unigram = SentencePieceUnigramTokenizer()
    # Every printable character as a word of its own, so any ASCII caption tokenizes without <unk>.
    unigram.train_from_iterator(
        [*corpus, " ".join(string.printable.strip())],
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    return T5TokenizerFast(
        tokenizer_object=unigram._tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )


def tiny_t5_encoder(vocab_size: int, d_model: int = 32, seed: int = 0):
    """A 2-layer T5 v1.1-style encoder (gated GELU, as PixArt's T5-XXL), random weights."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def save_tiny_t5(folder: str | Path, d_model: int = 32, seed: int = 0) -> Path:
    """folder/text_encoder (T5EncoderModel) and folder/tokenizer, loadable with from_pretrained."""
    folder = Path(folder)
    tokenizer = tiny_t5_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    tiny_t5_encoder(len(tokenizer), d_model, seed).save_pretrained(folder / "text_encoder")
    return folder


def tiny_clip_tokenizer(corpus: list[str] = CORPUS, vocab_size: int = 400, max_length: int = 16):
    """A CLIP tokenizer over a byte-level BPE trained on `corpus` (CLIP's `</w>` word ends, lower case)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizerFast

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator([*corpus, " ".join(string.printable.strip())], trainer)
    with tempfile.TemporaryDirectory() as files:  # CLIPTokenizerFast reads CLIP's vocab.json and merges.txt
        bpe.model.save(files)
        return CLIPTokenizerFast.from_pretrained(files, model_max_length=max_length)


def tiny_clip(vocab_size: int, max_length: int = 16, image_size: int = 32, seed: int = 0):
    """A 2-layer CLIPModel (text and 32 px vision towers, 16-d projections), random weights."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    towers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **towers,
            "vocab_size": vocab_size,
            "max_position_embeddings": max_length,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={**towers, "image_size": image_size, "patch_size": 8},
        projection_dim=16,
    )
    return CLIPModel(config).eval()


def save_tiny_clip(folder: str | Path, model=None, seed: int = 0) -> Path:
    """A CLIPModel (`model`, else a random tiny_clip) and its CLIPProcessor, loadable with from_pretrained."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    tokenizer = tiny_clip_tokenizer()
    model = model if model is not None else tiny_clip(len(tokenizer), tokenizer.model_max_length, seed=seed)
    size = model.config.vision_config.image_size
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)
    return Path(folder)


# -- PixArt -----------------------------------------------------------------------------------------

IMAGE_PX = 16  # the tiny VAE downsamples by 2: 8x8 latents, 4x4 tokens of patch 2


def make_tiny_transformer(layers: int = 4, text_width: int = 32, seed: int = 0, **overrides):
    """A PixArtTransformer2DModel 16 wide (2 heads of 8), `layers` blocks, reading `text_width`-d text."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    config = dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        cross_attention_dim=16,
        sample_size=IMAGE_PX // 2,
        patch_size=2,
        caption_channels=text_width,
        norm_num_groups=4,
    )
    return PixArtTransformer2DModel(**{**config, **overrides}).eval()


def make_tiny_pixart(
    folder: str | Path, *, pipeline: str = "PixArtAlphaPipeline", layers: int = 4, seed: int = 0, **transformer
) -> Path:
    """Save a tiny pipeline of class `pipeline` (PixArtAlphaPipeline or PixArtSigmaPipeline) into `folder`;
    `transformer`: overrides of the transformer's configuration."""
    import diffusers
    from conftest import make_tiny_vae
    from diffusers import DPMSolverMultistepScheduler

    tokenizer = tiny_t5_tokenizer()
    pipe = getattr(diffusers, pipeline)(
        tokenizer=tokenizer,
        text_encoder=tiny_t5_encoder(len(tokenizer), seed=seed),
        vae=make_tiny_vae(seed),
        transformer=make_tiny_transformer(layers, seed=seed, **transformer),
        # The scheduler PixArt-α/Σ ship: DPM-Solver++ on linear betas 1e-4..0.02 over 1000 steps, its defaults.
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.save_pretrained(folder)
    return Path(folder)


def make_captioned_data(root: Path, per_caption: int = 6) -> Path:
    """Flat-coloured images with sidecar captions naming the colour: learnable from the text alone."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for colour, channel in (("red", 0), ("blue", 2)):
        for i in range(per_caption):
            pixels = rng.integers(0, 30, (IMAGE_PX + 4, IMAGE_PX + 4, 3), dtype=np.uint8)
            pixels[..., channel] = 220
            Image.fromarray(pixels).save(root / f"{colour}-{i}.png")
            (root / f"{colour}-{i}.txt").write_text(f"a {colour} square\n")
    return root


def t2i_fit_config(data: Path, base: Path, tmp_path: Path, /, **overrides):
    """fit's settings for the tiny text-to-image tests: a few CPU steps, no checkpoints or previews, fp32
    adapter, caches under `tmp_path`; `overrides` change any field."""
    from difffit.engine.training.config import FitConfig

    options = dict(
        data=str(data),
        base=str(base),
        steps=6,
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


def record_batch_shapes(monkeypatch) -> list[tuple[int, ...]]:
    """The shape of every micro-batch of latents fit draws from here on (filled as it trains)."""
    from difffit.engine.data.batches import Batches

    shapes, draw = [], Batches.micro_batch

    def spy(self, step, micro, g):
        x0, y = draw(self, step, micro, g)
        shapes.append(tuple(x0.shape))
        return x0, y

    monkeypatch.setattr(Batches, "micro_batch", spy)
    return shapes


# -- SD3 and FLUX ----------------------------------------------------------------------------------------

FLOW_TEXT_WIDTH = 32  # the tiny T5's width: SD3's and FLUX's joint_attention_dim


def tiny_clip_text(vocab_size: int, *, projection: bool, max_length: int = 16, width: int = 16, seed: int = 0):
    """A 2-layer CLIP text tower `width` wide: CLIPTextModelWithProjection (SD3's two encoders, pooled output
    projected to `width`) or CLIPTextModel (FLUX's, pooled output as it is)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        projection_dim=width,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def make_tiny_vae16(seed: int = 0, *, scaling_factor: float = 1.5305, shift_factor: float = 0.0609):
    """A 2-level AutoencoderKL with SD3's and FLUX's 16 latent channels (factor 2), shifted and scaled as SD3's."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=IMAGE_PX,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def make_tiny_sd3_transformer(layers: int = 4, seed: int = 0, **overrides):
    """An SD3Transformer2DModel 16 wide (2 heads of 8), SD3.5-medium's kind: q/k RMSNorm, a second image
    attention in block 0; reads the tiny T5's width and two 16-d pooled CLIP outputs."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    config = dict(
        sample_size=IMAGE_PX // 2,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=FLOW_TEXT_WIDTH,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        pos_embed_max_size=8,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    return SD3Transformer2DModel(**{**config, **overrides}).eval()


def make_tiny_sd3(folder: str | Path, *, layers: int = 4, seed: int = 0, **transformer) -> Path:
    """Save a tiny StableDiffusion3Pipeline into `folder`: two CLIPs with projection, T5, the 16-channel VAE and
    SD3's scheduler (flow matching, shift 3); `transformer`: overrides of the transformer's configuration."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    clip, t5 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=make_tiny_sd3_transformer(layers, seed, **transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=make_tiny_vae16(seed),
        text_encoder=tiny_clip_text(len(clip), projection=True, seed=seed),
        tokenizer=clip,
        text_encoder_2=tiny_clip_text(len(clip), projection=True, seed=seed + 1),
        tokenizer_2=clip,
        text_encoder_3=tiny_t5_encoder(len(t5), FLOW_TEXT_WIDTH, seed),
        tokenizer_3=t5,
    )
    pipe.save_pretrained(folder)
    return Path(folder)


def make_tiny_flux_transformer(layers: int = 2, seed: int = 0, **overrides):
    """A FluxTransformer2DModel 16 wide (2 heads of 8; rope axes 2 + 2 + 4), `layers` joint and `layers` single
    blocks, FLUX.1-dev's kind (guidance embedding); reads the tiny T5's width and the tiny CLIP's 16-d pooled
    output, and 16 latent channels packed 2 x 2."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    config = dict(
        patch_size=1,
        in_channels=64,
        num_layers=layers,
        num_single_layers=layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=FLOW_TEXT_WIDTH,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    return FluxTransformer2DModel(**{**config, **overrides}).eval()


def make_tiny_flux(folder: str | Path, *, layers: int = 2, seed: int = 0, **overrides) -> Path:
    """Save a tiny FluxPipeline into `folder`: CLIP (pooled output as it is), T5, the 16-channel VAE shifted
    and scaled as FLUX.1's, and FLUX.1-dev's scheduler (dynamic shifting by resolution)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    clip, t5 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=make_tiny_flux_transformer(layers, seed, **overrides),
        scheduler=scheduler,
        vae=make_tiny_vae16(seed, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=tiny_clip_text(len(clip), projection=False, seed=seed),
        tokenizer=clip,
        text_encoder_2=tiny_t5_encoder(len(t5), FLOW_TEXT_WIDTH, seed),
        tokenizer_2=t5,
    )
    pipe.save_pretrained(folder)
    return Path(folder)


# every tiny text-to-image pipeline by family name, for tests that run each family
PIPELINES = {"pixart": make_tiny_pixart, "sd3": make_tiny_sd3, "flux": make_tiny_flux}


def make_mixed_aspect_data(root: Path, shapes: dict[tuple[int, int], int]) -> Path:
    """`shapes[(width, height)]` images of each size, captioned by colour and shape: aspect-ratio bucket data.
    The images of one size alternate red and blue, so each size has both captions."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for (width, height), count in shapes.items():
        for i in range(count):
            colour, channel = (("red", 0), ("blue", 2))[i % 2]
            pixels = rng.integers(0, 30, (height, width, 3), dtype=np.uint8)
            pixels[..., channel] = 220
            name = f"{width}x{height}-{i}"
            Image.fromarray(pixels).save(root / f"{name}.png")
            (root / f"{name}.txt").write_text(f"a {colour} picture, {width} by {height}\n")
    return root
