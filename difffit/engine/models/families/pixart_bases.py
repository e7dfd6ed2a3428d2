"""PixArt-α/Σ bases: diffusers pipelines (a Hub id, a local folder with model_index.json, or an alias).

A PixArt base is diffusers' own `PixArtTransformer2DModel` plus the pipeline's other components (T5
text encoder and tokenizer, VAE, scheduler), loaded as every pipeline base is (families/pipeline_bases.py).
The public Σ repos and the α 256 repo hold only a transformer; their aliases take the other components
from the repo the PixArt team publishes them in, as diffusers' documentation does.
"""

from __future__ import annotations

from difffit.engine.models.families.pipeline_bases import Alias, PipelineBase, PipelineKind

PIPELINES = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
TRANSFORMER_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")  # α repos still say the latter
SIGMA_COMPONENTS = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"
LICENSE = "openrail++"  # the PixArt team released PixArt-α/Σ under CreativeML Open RAIL++-M

ALIASES = {
    "PixArt-alpha-256": Alias(
        "PixArt-alpha/PixArt-XL-2-256x256", "PixArt-alpha/PixArt-XL-2-512x512", "PixArtAlphaPipeline", LICENSE
    ),
    "PixArt-alpha-512": Alias(
        "PixArt-alpha/PixArt-XL-2-512x512", "PixArt-alpha/PixArt-XL-2-512x512", "PixArtAlphaPipeline", LICENSE
    ),
    "PixArt-alpha-1024": Alias(
        "PixArt-alpha/PixArt-XL-2-1024-MS", "PixArt-alpha/PixArt-XL-2-1024-MS", "PixArtAlphaPipeline", LICENSE
    ),
    "PixArt-Sigma-512": Alias(
        "PixArt-alpha/PixArt-Sigma-XL-2-512-MS", SIGMA_COMPONENTS, "PixArtSigmaPipeline", LICENSE
    ),
    "PixArt-Sigma-1024": Alias(
        "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", SIGMA_COMPONENTS, "PixArtSigmaPipeline", LICENSE
    ),
}
# The XL/2 transformer as the public repos configure it (transformer/config.json), so `info` can count
# what each method trains without downloading anything. Per alias: sample_size (latent side) and the
# 1024-MS α model's resolution and aspect-ratio embedders (use_additional_conditions).
XL2_CONFIG = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "attention_type": "default",
    "caption_channels": 4096,
    "cross_attention_dim": 1152,
    "dropout": 0.0,
    "in_channels": 4,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_single",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "out_channels": 8,
    "patch_size": 2,
    "upcast_attention": False,
}
ALIAS_CONFIGS = {
    "PixArt-alpha-256": {"sample_size": 32, "use_additional_conditions": False},
    "PixArt-alpha-512": {"sample_size": 64, "use_additional_conditions": False},
    "PixArt-alpha-1024": {"sample_size": 128, "use_additional_conditions": True},
    "PixArt-Sigma-512": {"sample_size": 64, "use_additional_conditions": False},
    "PixArt-Sigma-1024": {"sample_size": 128, "use_additional_conditions": False, "interpolation_scale": 2},
}


def is_pixart_transformer(config: dict) -> bool:
    return config.get("_class_name") in TRANSFORMER_CLASSES and config.get("norm_type") == "ada_norm_single"


PIXART_KIND = PipelineKind(
    "pixart",
    "PixArt",
    "PixArtTransformer2DModel",
    PIPELINES,
    ALIASES,
    {name: {**XL2_CONFIG, **config} for name, config in ALIAS_CONFIGS.items()},
    is_pixart_transformer,
    PipelineBase,
    "tokenizer",
)
