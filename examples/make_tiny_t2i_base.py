"""Rebuild the bundled tiny text-to-image base (difffit/assets/tiny-t2i/, the `tiny-t2i` alias) from scratch.

The base is a real diffusers StableDiffusion3Pipeline folder that works in pixel space at 32x32:
- transformer: an SD3Transformer2DModel (5 joint blocks, 96 wide, patch 4: 8x8 image tokens, q/k RMSNorm as
  SD3.5), trained here;
- text encoders: two CLIP text towers with projection (their pooled outputs steer every block, as SD3's
  CLIP-L and CLIP-G do) sharing one CLIP tokenizer, and a 2-layer T5 encoder with its own tokenizer; random
  and frozen, as SD3's are frozen; both tokenizers are built with the `tokenizers` library over the
  captions' words;
- VAE: an AutoencoderKL of factor 1 whose weights are set so that it passes pixels through unchanged (to
  about 1e-6): latents are the RGB image itself, so nothing has to be learnt there;
- scheduler: SD3's flow-matching Euler scheduler, unshifted (a 32 px image needs no resolution shift).

Why SD3: its pooled text embedding conditions every block's adaLN as DiT's class label does, so the base
learns to follow captions within a few hundred steps (a PixArt-α base, whose text arrives only through
cross-attention, ignored its captions after 1200); it samples with classifier-free guidance; and its
DiffFit adapters export to ComfyUI (`merge --format comfyui`).

It is trained with difffit itself: `fit --method full` (recipes/tiny-t2i-base.toml) from the random
pipeline on 3000 captioned scenes drawn by examples/make_examples.py's `write_scenes` (a red, green, blue or
yellow circle, square, triangle or cross at one of five places, on a light background), then merged with
`difffit merge` into the asset folder.

    python examples/make_tiny_t2i_base.py     # draw data -> init pipeline -> fit -> merge (deterministic)
"""

from __future__ import annotations

import math
import os
import shutil
import string
import subprocess
import sys
from collections import Counter
from itertools import product
from pathlib import Path

import torch
from make_examples import SCENE_BACKGROUNDS, SCENE_COLOURS, SCENE_PLACES, SCENE_SHAPES, scene_caption, write_scenes

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "runs" / "tiny-t2i-base"
DATA, INIT = REPO / "runs" / "tiny-t2i-data", REPO / "runs" / "tiny-t2i-init"  # inputs live outside the run
ASSET = REPO / "difffit" / "assets" / "tiny-t2i"
SCENES = 3000
TEXT_WIDTH = 64  # T5's width: SD3's joint_attention_dim, which holds both CLIPs' hidden states side by side
CLIP_WIDTH = 32
TEXT_TOKENS = 16  # the CLIP tokenizer's length (SD3 pads CLIP to it) and --max-text-tokens for T5
BIG = 1000.0  # the constant channels that pin the VAE's GroupNorm statistics (see identity_vae)
LIFT = 20.0  # the shift that puts SiLU on its linear part: silu(x + 20) = x + 20 to 2e-9 relative


def all_captions() -> list[str]:
    """Every caption either style of scene writes."""
    return [
        scene_caption(*scene, style)
        for scene in product(SCENE_SHAPES, SCENE_COLOURS, SCENE_PLACES)
        for style in SCENE_BACKGROUNDS
    ]


def t5_tokenizer():
    """A T5 tokenizer (unigram; <pad> 0, </s> 1, <unk> 2, as T5's) over the captions' words.

    Its pieces are every word of every caption either style writes, scored by their log frequency in those
    captions (the unigram model's maximum-likelihood scores for whole words), plus every printable character
    alone and after a word boundary, scored far below, so any ASCII text tokenizes without <unk>. (The
    `tokenizers` unigram trainer splits such a small corpus into characters.)
    """
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import T5TokenizerFast

    counts = Counter(word for caption in all_captions() for word in caption.split())
    total = sum(counts.values())
    pieces = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0}
    pieces.update({"\u2581" + word: math.log(n / total) for word, n in counts.most_common()})
    chars = string.printable.strip()
    pieces.update({piece: -20.0 for piece in ["\u2581", *chars, *("\u2581" + c for c in chars)] if piece not in pieces})
    unigram = SentencePieceUnigramTokenizer(vocab=list(pieces.items()))
    return T5TokenizerFast(
        tokenizer_object=unigram._tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=TEXT_TOKENS,
    )


def t5_encoder(vocab_size: int):
    """A 2-layer T5 v1.1-style encoder (gated GELU, as PixArt's T5-XXL), random weights."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=TEXT_WIDTH,
        d_kv=16,
        d_ff=2 * TEXT_WIDTH,
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


def clip_tokenizer():
    """A CLIP tokenizer (BPE with CLIP's `</w>` word ends, lower case) whose merges spell every caption word
    whole, so each word is one token; any other text falls back to its letters."""
    import tempfile

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizerFast

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # CLIP's own pre-tokenizer splits words the same way
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator([*all_captions(), " ".join(string.printable.strip())], trainer)
    with tempfile.TemporaryDirectory() as files:  # CLIPTokenizerFast reads CLIP's vocab.json and merges.txt
        bpe.model.save(files)
        return CLIPTokenizerFast.from_pretrained(files, model_max_length=TEXT_TOKENS)


def clip_encoder(vocab_size: int, seed: int):
    """A 2-layer CLIP text tower with projection (SD3's encoder kind), random weights."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_WIDTH,
        intermediate_size=2 * CLIP_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TEXT_TOKENS,
        projection_dim=CLIP_WIDTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def identity_vae():
    """A factor-1 AutoencoderKL (3 latent channels) whose encoder and decoder each pass pixels through.

    Each half is conv_in -> resnets -> GroupNorm -> SiLU -> conv_out. The resnets' last convolutions are zero,
    so each resnet is the identity. conv_in writes (x, -x, BIG, -BIG): one group's mean is then exactly 0
    and its standard deviation BIG / 2 up to 1e-6, so the GroupNorm's affine weight BIG / 2 undoes it; its bias
    LIFT puts SiLU on its linear part, and conv_out takes LIFT off. The encoder's log-variance is -30.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=1,
        sample_size=32,
        mid_block_add_attention=False,
        scaling_factor=1.0,
        shift_factor=0.0,
    )
    with torch.no_grad():
        for half in (vae.encoder, vae.decoder):
            for name, module in half.named_modules():
                if name.endswith("conv2"):
                    module.weight.zero_()
                    module.bias.zero_()
            conv_in, norm = half.conv_in, half.conv_norm_out
            conv_in.weight.zero_()
            conv_in.bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, BIG, -BIG]))
            for c in range(3):
                conv_in.weight[c, c, 1, 1], conv_in.weight[3 + c, c, 1, 1] = 1.0, -1.0
            norm.weight.copy_(torch.tensor([BIG / 2] * 6 + [0, 0]))
            norm.bias.copy_(torch.tensor([LIFT] * 6 + [0, 0]))
            half.conv_out.weight.zero_()
            half.conv_out.bias.zero_()
            for c in range(3):
                half.conv_out.weight[c, c, 1, 1] = 1.0
                half.conv_out.bias[c] = -LIFT
        vae.encoder.conv_out.bias[3:] = -30.0  # log-variance: std e^-15, as good as none
        for conv in (vae.quant_conv, vae.post_quant_conv):
            conv.weight.copy_(torch.eye(conv.weight.shape[0])[:, :, None, None])
            conv.bias.zero_()
    return vae.eval()


def write_init() -> None:
    """The random pipeline the recipe starts from, saved by diffusers' save_pretrained."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip, t5 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    text_encoder_3 = t5_encoder(len(t5))
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=4,
        in_channels=3,
        out_channels=3,
        num_layers=5,
        attention_head_dim=24,
        num_attention_heads=4,
        joint_attention_dim=TEXT_WIDTH,
        caption_projection_dim=96,
        pooled_projection_dim=2 * CLIP_WIDTH,
        pos_embed_max_size=8,
        qk_norm="rms_norm",
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=identity_vae(),
        text_encoder=clip_encoder(len(clip), seed=1),
        tokenizer=clip,
        text_encoder_2=clip_encoder(len(clip), seed=2),
        tokenizer_2=clip,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5,
    )
    shutil.rmtree(INIT, ignore_errors=True)
    pipe.save_pretrained(INIT)


def difffit(*args: str) -> None:
    # One thread: a model this small gains nothing from more, and the result is then the same on any machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "difffit", *args], check=True, cwd=REPO, env=env)


def main() -> None:
    for scratch in (DATA, RUN):  # this script's own folders: a rebuild starts from nothing, never resumes
        shutil.rmtree(scratch, ignore_errors=True)
    write_scenes(DATA, SCENES, "light", seed=3)
    write_init()
    difffit("fit", "--recipe", str(REPO / "recipes" / "tiny-t2i-base.toml"))
    difffit("merge", str(RUN / "adapter.safetensors"), "--out", str(ASSET), "--overwrite")
    size = sum(f.stat().st_size for f in ASSET.rglob("*") if f.is_file())
    print(f"wrote {ASSET} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
