"""The SD3 family: Stable Diffusion 3 and 3.5 (`StableDiffusion3Pipeline`, diffusers' `SD3Transformer2DModel`).

An MM-DiT: each joint block runs the image tokens and the text tokens (two CLIPs' hidden states beside
T5's) as two streams with their own weights and one shared attention; SD3.5-medium adds a second
self-attention on the image stream in its first 13 blocks, SD3.5 normalises q and k (RMSNorm with weights).

What DiffFit trains here (`--method difffit`, shared with FLUX in flow_family.py): every bias except the
timestep embedder's (`time_text_embed.timestep_embedder`; the pooled-text projection beside it trains, as
the class table does on DiT), the q/k RMSNorm weights, and gamma on the output projection of every residual
branch of both streams: `attn.to_out.0` (image attention), `attn.to_add_out` (text attention), `attn2.to_out.0`
(SD3.5-medium's second image attention), `ff.net.2` and `ff_context.net.2` (the MLPs); the last block has
no text outputs (its text stream ends there), so it has none there. gamma folds into those projections.

Conditioning: the pipeline's `encode_prompt` gives `prompt_embeds` (77 CLIP tokens, both CLIPs' hidden
states side by side, zero-padded to T5's width, then `--max-text-tokens` T5 tokens) and
`pooled_prompt_embeds` (both CLIPs' pooled projections). Caption dropout replaces all of them with the
empty caption's, which is what the pipeline's guidance encodes as its unconditional input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difffit.engine.models.families.flow_family import FlowFamily
from difffit.engine.models.families.pipeline_bases import Alias, PipelineBase, PipelineKind
from difffit.engine.models.family import ModelCall
from difffit.engine.models.gamma import GammaPlacement
from difffit.engine.models.lora_names import SD3_LORA

TRANSFORMER = "SD3Transformer2DModel"
PIPELINE = "StableDiffusion3Pipeline"
REPOS = {
    "SD3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "SD3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "SD3.5-large": "stabilityai/stable-diffusion-3.5-large",
    "SD3.5-large-turbo": "stabilityai/stable-diffusion-3.5-large-turbo",
}
# Every repo is under Stability AI's Community License, a license of its own ("other" on the Hub).
ALIASES = {name: Alias(repo, repo, PIPELINE, "other", "stabilityai-ai-community") for name, repo in REPOS.items()}
# The transformers as their repos configure them (transformer/config.json), so `info` counts what each
# method trains without downloading anything (the repos are gated besides).
_COMMON = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "attention_head_dim": 64,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 2048,
}
_LARGE = {
    **_COMMON,
    "num_layers": 38,
    "num_attention_heads": 38,
    "caption_projection_dim": 2432,
    "pos_embed_max_size": 192,
    "dual_attention_layers": [],
    "qk_norm": "rms_norm",
}
ALIAS_CONFIGS = {
    "SD3-medium": {
        **_COMMON,
        "num_layers": 24,
        "num_attention_heads": 24,
        "caption_projection_dim": 1536,
        "pos_embed_max_size": 192,
        "dual_attention_layers": [],
        "qk_norm": None,
    },
    "SD3.5-medium": {
        **_COMMON,
        "num_layers": 24,
        "num_attention_heads": 24,
        "caption_projection_dim": 1536,
        "pos_embed_max_size": 384,
        "dual_attention_layers": list(range(13)),
        "qk_norm": "rms_norm",
    },
    "SD3.5-large": _LARGE,
    "SD3.5-large-turbo": _LARGE,
}
# Steps and guidance the model cards recommend where they differ from the pipeline's (28 steps, 7.0).
CARD_DEFAULTS = {
    REPOS["SD3.5-medium"]: {"steps": 40, "cfg_scale": 4.5},
    REPOS["SD3.5-large"]: {"steps": 28, "cfg_scale": 3.5},
    REPOS["SD3.5-large-turbo"]: {"steps": 4, "cfg_scale": 0.0},
}
KNOWN = {(24, 1536, False): "SD3-medium", (24, 1536, True): "SD3.5-medium", (38, 2432, False): "SD3.5-large"}
BRANCHES = ("attn.to_out.0", "attn.to_add_out", "attn2.to_out.0", "ff.net.2", "ff_context.net.2")
QKV = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
)


def is_sd3_transformer(config: dict) -> bool:
    return config.get("_class_name") == TRANSFORMER


SD3_KIND = PipelineKind(
    "sd3", "SD3", TRANSFORMER, (PIPELINE,), ALIASES, ALIAS_CONFIGS, is_sd3_transformer, PipelineBase, "tokenizer_3"
)


class SD3Family(FlowFamily):
    name = "sd3"
    title = "SD3"
    kind = SD3_KIND
    lora = SD3_LORA
    gamma = GammaPlacement.on_projections({"transformer_blocks": BRANCHES}, {"transformer_blocks": QKV})
    frozen_embedders = ("time_text_embed.timestep_embedder.",)
    shape_keys = (
        "num_layers",
        "num_attention_heads",
        "attention_head_dim",
        "patch_size",
        "in_channels",
        "out_channels",
        "joint_attention_dim",
        "caption_projection_dim",
        "pooled_projection_dim",
        "dual_attention_layers",
        "qk_norm",
    )
    config_keys = (
        "num_layers",
        "num_attention_heads",
        "attention_head_dim",
        "patch_size",
        "sample_size",
        "in_channels",
        "joint_attention_dim",
        "caption_projection_dim",
        "pooled_projection_dim",
    )
    card_defaults = CARD_DEFAULTS
    # fp8: the embedders, the adaLN modulation projections of both streams and the output layer stay bf16.
    keep_bf16 = (
        "pos_embed.*",
        "time_text_embed.*",
        "context_embedder",
        "*.norm1.*",
        "*.norm1_context.*",
        "norm_out.*",
        "proj_out",
    )

    def owns(self, model: nn.Module) -> bool:
        return type(model).__name__ == TRANSFORMER

    def shape_fields(self, config: dict) -> dict:
        return {
            "latent_size": config["sample_size"],
            **self.channels(config),
            "patch_size": config["patch_size"],
            "text_channels": config["joint_attention_dim"],
        }

    def latent_size(self, config: dict) -> int:
        return config["sample_size"]

    def architecture(self, config: dict) -> str:
        depth, width = config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]
        known = KNOWN.get((depth, width, bool(config.get("dual_attention_layers"))))
        return known or f"SD3-d{depth}-w{width}/{config['patch_size']}"

    def largest_side(self, base: PipelineBase) -> int | None:
        # SD3 crops its positional table to the image; diffusers raises mid-step beyond the table's size.
        config = base.model.config
        return config.pos_embed_max_size * config.patch_size * base.vae_factor if config.pos_embed_max_size else None

    def forward(self, model: nn.Module, base: PipelineBase | None) -> ModelCall:
        def call(x: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
            return model(
                hidden_states=x,
                timestep=t,
                encoder_hidden_states=text["prompt_embeds"].to(x.dtype),
                pooled_projections=text["pooled_prompt_embeds"].to(x.dtype),
                return_dict=False,
            )[0]

        return call

    def encode(self, pipe: Any, texts: list[str], device: torch.device, max_tokens: int) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(
            texts, None, None, device=device, do_classifier_free_guidance=False, max_sequence_length=max_tokens
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def pipeline_inputs(self, base: PipelineBase, text: dict, negative: dict, cfg_scale: float) -> dict:
        return {
            "prompt_embeds": text["prompt_embeds"].float(),
            "pooled_prompt_embeds": text["pooled_prompt_embeds"].float(),
            "negative_prompt_embeds": negative["prompt_embeds"].float(),
            "negative_pooled_prompt_embeds": negative["pooled_prompt_embeds"].float(),
            "guidance_scale": cfg_scale,
        }


SD3 = SD3Family()
