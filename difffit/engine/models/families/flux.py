"""The FLUX family: FLUX.1-dev and FLUX.1-schnell (`FluxPipeline`, diffusers' `FluxTransformer2DModel`).

An MM-DiT in two parts: 19 joint blocks run the image tokens and the T5 text tokens as two streams with
their own weights and one shared attention (as SD3's do), then 38 single blocks run the concatenated
sequence as one stream whose attention and MLP read the same normalised input and write through ONE
fused output projection, `proj_out` (attention output and MLP activations side by side). The pooled CLIP
output and the timestep (and FLUX.1-dev's guidance scale) modulate every block.

What DiffFit trains here (`--method difffit`, rules shared with SD3 in flow_family.py): every bias except
the timestep and guidance embedders' (`time_text_embed.timestep_embedder`, `...guidance_embedder`; the
pooled-text projection beside them trains), the q/k RMSNorm weights of both streams, and gamma on the
output projection of every residual branch: in a joint block `attn.to_out.0` and `ff.net.2` (image
stream), `attn.to_add_out` and `ff_context.net.2` (text stream); in a single block `proj_out`, the fused
projection of its attention and MLP, so one gamma scales both branches of a single block (it has no
separate output projection per branch to fold into). gamma folds into those projections. Blocks are
counted joint first, then single (57 in all), and the default is the first half: the 19 joint blocks and
the first 9 single ones.

The transformer reads latents packed 2 x 2 into tokens (64 channels from the VAE's 16) with position
ids, and its timestep as a fraction; the forward here does what FluxPipeline does around its call
(its own `_pack_latents`, `_prepare_latent_image_ids`, `_unpack_latents`), so the family trains on the
VAE's 16-channel latents like every other. FLUX.1-dev embeds the guidance scale: training feeds it the
pipeline's default guidance scale (3.5), as FluxPipeline does at that default and diffusers' FLUX
training scripts do. Its scheduler shifts by resolution (dynamic shifting), in training as in sampling.

Conditioning: `prompt_embeds` (T5, `--max-text-tokens` tokens: 512 for FLUX.1-dev, 256 for schnell, as
their cards sample) and `pooled_prompt_embeds` (CLIP's pooled output). Caption dropout defaults to 0:
FLUX.1 samples with guidance distilled into one conditional pass (dev) or none (schnell), so there is no
unconditional branch to train; `--caption-dropout P` still trains on the empty caption if asked.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from difffit.engine.models.families.flow_family import FlowFamily
from difffit.engine.models.families.pipeline_bases import Alias, PipelineBase, PipelineKind, pipeline_default, read_json
from difffit.engine.models.family import ModelCall
from difffit.engine.models.gamma import GammaPlacement
from difffit.engine.models.lora_names import FLUX_LORA

TRANSFORMER = "FluxTransformer2DModel"
PIPELINE = "FluxPipeline"
REPOS = {"FLUX.1-dev": "black-forest-labs/FLUX.1-dev", "FLUX.1-schnell": "black-forest-labs/FLUX.1-schnell"}
# FLUX.1-dev is under its own non-commercial license ("other"), schnell under Apache 2.0.
ALIASES = {
    "FLUX.1-dev": Alias(
        REPOS["FLUX.1-dev"], REPOS["FLUX.1-dev"], PIPELINE, "other", "flux-1-dev-non-commercial-license"
    ),
    "FLUX.1-schnell": Alias(REPOS["FLUX.1-schnell"], REPOS["FLUX.1-schnell"], PIPELINE, "apache-2.0"),
}
# The transformers as their repos configure them (transformer/config.json), so `info` counts what each
# method trains without downloading anything (FLUX.1-dev is gated besides).
_FLUX1 = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "axes_dims_rope": [16, 56, 56],
}
ALIAS_CONFIGS = {
    "FLUX.1-dev": {**_FLUX1, "guidance_embeds": True},
    "FLUX.1-schnell": {**_FLUX1, "guidance_embeds": False},
}
# What the model cards sample with (FLUX.1-dev: 50 steps at guidance 3.5; schnell: 4 steps, no guidance,
# 256 T5 tokens). A base without guidance embedding is schnell's kind, wherever it was loaded from.
DEV_CARD, SCHNELL_CARD = {"steps": 50, "cfg_scale": 3.5}, {"steps": 4, "cfg_scale": 0.0}
CARD_DEFAULTS = {REPOS["FLUX.1-dev"]: DEV_CARD, REPOS["FLUX.1-schnell"]: SCHNELL_CARD}
SCHNELL_TEXT_TOKENS = 256
PACK = 2  # FluxPipeline packs 2 x 2 latent pixels into one token
KNOWN = {(19, 38, 3072, True): "FLUX.1-dev", (19, 38, 3072, False): "FLUX.1-schnell"}
JOINT_BRANCHES = ("attn.to_out.0", "ff.net.2", "attn.to_add_out", "ff_context.net.2")
JOINT_QKV = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
SINGLE_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")


def is_flux_transformer(config: dict) -> bool:
    return config.get("_class_name") == TRANSFORMER


def _pipeline():
    from diffusers import FluxPipeline

    return FluxPipeline


class FluxBase(PipelineBase):
    """A FLUX pipeline base. Its transformer config has no image size: the base trains and samples at the
    size its VAE is configured for (FLUX.1's: 1024 px, the pipeline's default too)."""

    @property
    def resolution(self) -> int:
        if self.source_format == "config":  # not downloaded: FluxPipeline's default, 128 latent pixels x 8
            return 1024
        vae = read_json(self.components.path("vae", "the VAE") / "config.json")
        return int(vae.get("sample_size", 1024))

    @property
    def max_text_tokens(self) -> int:
        if self.text_tokens:
            return self.text_tokens
        dev = self.model.config.guidance_embeds  # FLUX.1-dev's pipeline reads 512 tokens, schnell 256
        tokens = pipeline_default(self.pipeline, "max_sequence_length") if dev else SCHNELL_TEXT_TOKENS
        return self.tokenizer_capped(tokens)


FLUX_KIND = PipelineKind(
    "flux", "FLUX", TRANSFORMER, (PIPELINE,), ALIASES, ALIAS_CONFIGS, is_flux_transformer, FluxBase, "tokenizer_2"
)


class FluxFamily(FlowFamily):
    name = "flux"
    title = "FLUX"
    kind = FLUX_KIND
    lora = FLUX_LORA
    # the joint blocks, then the single ones
    gamma = GammaPlacement.on_projections(
        {"transformer_blocks": JOINT_BRANCHES, "single_transformer_blocks": ("proj_out",)},
        {"transformer_blocks": JOINT_QKV, "single_transformer_blocks": SINGLE_QKV},
    )
    frozen_embedders = ("time_text_embed.timestep_embedder.", "time_text_embed.guidance_embedder.")
    shape_keys = (
        "num_layers",
        "num_single_layers",
        "num_attention_heads",
        "attention_head_dim",
        "patch_size",
        "in_channels",
        "out_channels",
        "joint_attention_dim",
        "pooled_projection_dim",
        "guidance_embeds",
        "axes_dims_rope",
    )
    config_keys = (
        "num_layers",
        "num_single_layers",
        "num_attention_heads",
        "attention_head_dim",
        "in_channels",
        "joint_attention_dim",
        "pooled_projection_dim",
        "guidance_embeds",
    )
    card_defaults = CARD_DEFAULTS
    # fp8: the embedders, the adaLN modulation projections (joint blocks' both streams, single blocks' `norm`)
    # and the output layer stay bf16; a single block's fused proj_out is a block matrix and goes float8.
    keep_bf16 = (
        "x_embedder",
        "context_embedder",
        "time_text_embed.*",
        "*.norm1.*",
        "*.norm1_context.*",
        "single_transformer_blocks.*.norm.*",
        "norm_out.*",
        "proj_out",
    )
    caption_dropout = 0.0  # no unconditional branch at sampling (see the module docstring)
    negative_prompts = False

    def owns(self, model: nn.Module) -> bool:
        return type(model).__name__ == TRANSFORMER

    def channels(self, config: dict) -> dict:
        # The VAE's latent channels: the transformer's 64 inputs are 2 x 2 packed latent pixels.
        return {"in_channels": config["in_channels"] // PACK**2, "learn_sigma": False}

    def shape_fields(self, config: dict) -> dict:
        return {
            "latent_size": self.latent_size(config),
            **self.channels(config),
            "patch_size": PACK,
            "text_channels": config["joint_attention_dim"],
        }

    def describe(self, base: FluxBase) -> dict:
        return {**super().describe(base), "latent_size": base.resolution // base.vae_factor}

    def latent_size(self, config: dict) -> int:
        return 128  # not in the config: FluxPipeline's default (1024 px at the VAE's factor 8)

    def architecture(self, config: dict) -> str:
        depth, single = config["num_layers"], config["num_single_layers"]
        width = config["num_attention_heads"] * config["attention_head_dim"]
        known = KNOWN.get((depth, single, width, bool(config.get("guidance_embeds"))))
        return known or f"FLUX-d{depth}+{single}-w{width}"

    def forward(self, model: nn.Module, base: PipelineBase | None) -> ModelCall:
        """`fn(x, t, text)` on (B, 16, H, W) latents and timesteps in [0, 1000]: packed, called and unpacked
        as FluxPipeline does, FLUX.1-dev given the pipeline's default guidance scale."""
        pipeline = _pipeline()
        guided = getattr(model, "module", model).config.guidance_embeds  # DDP wraps the model
        guidance = float(pipeline_default(PIPELINE, "guidance_scale"))

        def call(x: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
            b, c, h, w = x.shape
            embeds = text["prompt_embeds"].to(x.dtype)
            out = model(
                hidden_states=pipeline._pack_latents(x, b, c, h, w),
                timestep=t / 1000,
                guidance=torch.full((b,), guidance, device=x.device) if guided else None,
                pooled_projections=text["pooled_prompt_embeds"].to(x.dtype),
                encoder_hidden_states=embeds,
                txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype),
                img_ids=pipeline._prepare_latent_image_ids(b, h // PACK, w // PACK, x.device, x.dtype),
                return_dict=False,
            )[0]
            return pipeline._unpack_latents(out, h, w, 1)

        return call

    def encode(self, pipe: Any, texts: list[str], device: torch.device, max_tokens: int) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(texts, None, device=device, max_sequence_length=max_tokens)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def pipeline_inputs(self, base: PipelineBase, text: dict, negative: dict, cfg_scale: float) -> dict:
        # guidance_scale is FLUX.1-dev's embedded guidance (schnell ignores it); no negative branch.
        return {
            "prompt_embeds": text["prompt_embeds"].float(),
            "pooled_prompt_embeds": text["pooled_prompt_embeds"].float(),
            "guidance_scale": cfg_scale,
        }

    def card(self, base: PipelineBase) -> dict:
        return self.card_defaults.get(base.hub_id) or ({} if base.model.config.guidance_embeds else SCHNELL_CARD)

    def size_multiple(self, base: PipelineBase) -> int:
        return math.lcm(8, base.vae_factor * PACK)  # whole 2 x 2 packs of latent pixels, as check_inputs asks


FLUX = FluxFamily()
