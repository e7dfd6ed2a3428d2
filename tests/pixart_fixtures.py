"""A tiny PixArt-α/Σ pipeline built in the test: a few-block PixArtTransformer2DModel, a small T5 with a
tokenizer trained here, a small VAE and the scheduler the real pipelines ship, saved with the pipeline's
own save_pretrained so it loads through the same code path as a Hub id. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

CAPTIONS = ["a red square", "a blue square", "a green circle on black", "a photo of a red cat",
            "blue stripes", "a bowl of ramen, studio light", ""]
IMAGE_PX = 16  # the tiny VAE downsamples by 2: 8x8 latents, 4x4 tokens of patch 2


def make_tokenizer(texts=CAPTIONS, max_length: int = 16):
    """A unigram tokenizer trained on `texts`, as the T5TokenizerFast PixArt's pipelines take."""
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import T5TokenizerFast

    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator([t for t in texts if t] * 20, vocab_size=64, show_progress=False,
                                special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    return T5TokenizerFast(tokenizer_object=unigram._tokenizer, pad_token="<pad>", eos_token="</s>",
                           unk_token="<unk>", extra_ids=0, model_max_length=max_length)


def make_tiny_t5(tokenizer, width: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_ff=2 * width, num_layers=2, num_heads=4, d_kv=8,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config).eval()


def make_tiny_transformer(layers: int = 4, text_width: int = 32, seed: int = 0, **overrides):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    config = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=layers,
                  cross_attention_dim=16, sample_size=IMAGE_PX // 2, patch_size=2, caption_channels=text_width,
                  norm_num_groups=4)
    return PixArtTransformer2DModel(**{**config, **overrides}).eval()


def make_tiny_pixart(folder: Path, *, pipeline: str = "PixArtAlphaPipeline", layers: int = 4, seed: int = 0,
                     max_tokens: int = 16) -> Path:
    """Save a tiny pipeline of class `pipeline` (PixArtAlphaPipeline or PixArtSigmaPipeline) into `folder`."""
    import diffusers
    from conftest import make_tiny_vae
    from diffusers import DPMSolverMultistepScheduler

    tokenizer = make_tokenizer(max_length=max_tokens)
    pipe = getattr(diffusers, pipeline)(
        tokenizer=tokenizer, text_encoder=make_tiny_t5(tokenizer, seed=seed), vae=make_tiny_vae(seed),
        transformer=make_tiny_transformer(layers, seed=seed),
        # The scheduler PixArt-α/Σ ship (DPM-Solver++ on linear betas 1e-4..0.02, 1000 steps): its defaults.
        scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(folder)
    return folder


def make_captioned_data(root: Path, per_caption: int = 6) -> Path:
    """Flat-coloured images with sidecar captions naming the colour: learnable from the text alone."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for colour, channel in (("red", 0), ("blue", 2)):
        for i in range(per_caption):
            pixels = rng.integers(0, 30, (IMAGE_PX + 4, IMAGE_PX + 4, 3), dtype=np.uint8)
            pixels[..., channel] = 220
            Image.fromarray(pixels).save(root / f"{colour}-{i}.png")
            (root / f"{colour}-{i}.txt").write_text(f"a {colour} square\n")
    return root
