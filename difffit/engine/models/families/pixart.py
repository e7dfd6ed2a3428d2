"""The PixArt family (PixArt-α and PixArt-Σ): diffusers' `PixArtTransformer2DModel`, text-conditional.

What DiffFit trains here (`--method difffit`):
- every bias except the timestep embedder's (`adaln_single.emb.*`: the timestep embedder, and the
  1024-MS α model's resolution and aspect-ratio embedders, the same kind of input embedder);
- each block's `scale_shift_table` and the final one: PixArt's per-block modulation is a table added
  to a shared projection of the timestep, so the table is the counterpart of DiT's adaLN bias;
- affine norm parameters where there are any (stock PixArt has none);
- gamma: one vector per residual branch (self-attention, cross-attention, MLP) of the first half of
  the blocks by default, on the branch's output projection (`attn1.to_out.0`, `attn2.to_out.0`,
  `ff.net.2`), before the gated residual add; `branch+attn` adds gamma on the q, k and v projections.

`--mixed-precision fp8`: every block Linear in float8 (gamma's projections included, keeping their gamma);
the embedders (`pos_embed`, `adaln_single`: timestep and micro-condition embedders plus the shared
modulation projection, `caption_projection`) and the final `proj_out` stay bf16, as DiT's embedders, adaLN
and final layer do. `--grad-checkpointing` is diffusers' own, block by block.

bitfit trains every bias and the modulation tables; full every parameter; lora peft's LoRA on the
attention projections (to_q, to_k, to_v, to_out.0 of both attentions, as diffusers' scripts do).

Text: captions and prompts are encoded by the pipeline class's own `encode_prompt` (its tokenizer padding,
truncation and attention mask). Captions are not "cleaned" (`clean_caption=False`): the pipeline's cleaning
needs bs4 and ftfy and rewrites text (lower case, URLs); difffit encodes what was written, at training and
at sampling alike.

The loss is DiT's: PixArt predicts epsilon and a learned variance (8 output channels) on linear betas,
so the hybrid loss of engine/models/diffusion.py applies as it is (betas read off the pipeline's
scheduler config).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difffit.engine.errors import DiffFitError
from difffit.engine.models.diffusion import GaussianDiffusion
from difffit.engine.models.families.pipeline_bases import PipelineBase, pipeline_default
from difffit.engine.models.families.pixart_bases import PIXART_KIND, TRANSFORMER_CLASSES
from difffit.engine.models.families.text_family import TextFamily
from difffit.engine.models.family import ModelCall
from difffit.engine.models.gamma import GammaPlacement
from difffit.engine.models.lora_names import PIXART_LORA

__all__ = ["PIXART"]
BRANCHES = ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")  # the output projection of each residual branch
QKV = tuple(f"attn{i}.to_{x}" for i in (1, 2) for x in "qkv")
SCHEDULES = ("linear", "scaled_linear")
# --scheduler names -> diffusers classes, built from the pipeline's own scheduler config.
SCHEDULERS = {"dpm-solver": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler"}


class PixArtFamily(TextFamily):
    name = "pixart"
    title = "PixArt"
    kind = PIXART_KIND
    lora = PIXART_LORA
    schedulers = ("pipeline", *SCHEDULERS)  # "pipeline": the pipeline's own (PixArt's: dpm-solver)
    scheduler_classes = SCHEDULERS
    gamma = GammaPlacement.on_projections({"transformer_blocks": BRANCHES}, {"transformer_blocks": QKV})
    frozen_embedders = ("adaln_single.emb.",)  # timestep (and resolution / aspect-ratio) embedders
    tables = ("scale_shift_table",)
    pipeline_call = {
        "arguments": ", clean_caption=False",
        "same_images": "difffit samples through this same "
        "pipeline class, with captions as written (`clean_caption=False`): given the same prompt, seed "
        "and `use_resolution_binning=False`, diffusers draws difffit's images.",
    }
    keep_bf16 = ("pos_embed.*", "adaln_single.*", "caption_projection.*", "proj_out")
    shape_keys = (
        "num_layers",
        "num_attention_heads",
        "attention_head_dim",
        "patch_size",
        "in_channels",
        "out_channels",
        "caption_channels",
        "cross_attention_dim",
        "use_additional_conditions",
    )
    config_keys = (
        "num_layers",
        "num_attention_heads",
        "attention_head_dim",
        "patch_size",
        "sample_size",
        "in_channels",
        "out_channels",
        "caption_channels",
    )

    def text_token_limit(self, base: PipelineBase | None = None) -> int | None:
        # The pipeline's own token count (PixArt-α 120, Σ 300): what its published models were trained to read.
        return None if base is None else pipeline_default(base.pipeline, "max_sequence_length")

    def owns(self, model: nn.Module) -> bool:
        return (
            type(model).__name__ in TRANSFORMER_CLASSES
            and getattr(model, "config", {}).get("norm_type") == "ada_norm_single"
        )

    def shape_fields(self, config: dict) -> dict:
        return {
            "latent_size": config["sample_size"],
            **self.channels(config),
            "patch_size": config["patch_size"],
            "text_channels": config["caption_channels"],
        }

    def latent_size(self, config: dict) -> int:
        return config["sample_size"]

    def architecture(self, config: dict) -> str:
        depth, width = config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]
        size = {(28, 1152): "XL"}.get((depth, width), f"d{depth}-w{width}")
        return f"PixArt-{size}/{config['patch_size']}"

    def forward(self, model: nn.Module, base: PipelineBase | None) -> ModelCall:
        """`base` (its VAE factor) is needed only by the 1024-MS α model's pixel-size micro-conditions."""
        inner = getattr(model, "module", model)  # DDP wraps the model

        def call(x: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
            return model(
                x,
                encoder_hidden_states=text["prompt_embeds"].to(x.dtype),
                encoder_attention_mask=text["prompt_attention_mask"],
                timestep=t,
                added_cond_kwargs=micro_conditions(inner, x, base),
                return_dict=False,
            )[0]

        return call

    def diffusion(self, base: PipelineBase, timestep_sampling: str | None = None) -> GaussianDiffusion:
        config = base.scheduler_config()
        schedule = config.get("beta_schedule", "linear")
        if schedule not in SCHEDULES or config.get("prediction_type", "epsilon") != "epsilon":
            raise DiffFitError(
                f"The base {base.spec} trains with a {schedule} {config.get('prediction_type')} "
                "schedule; difffit trains PixArt's epsilon prediction on linear betas only."
            )
        start, end, steps = (
            config.get("beta_start", 1e-4),
            config.get("beta_end", 0.02),
            config.get("num_train_timesteps", 1000),
        )
        if schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(start, end, steps, dtype=torch.float64)
        return GaussianDiffusion(num_train_steps=steps, betas=betas)

    def encode(self, pipe: Any, texts: list[str], device: torch.device, max_tokens: int) -> dict[str, torch.Tensor]:
        embeds, mask, _, _ = pipe.encode_prompt(
            texts, do_classifier_free_guidance=False, device=device, clean_caption=False, max_sequence_length=max_tokens
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def pipeline_inputs(self, base: PipelineBase, text: dict, negative: dict, cfg_scale: float) -> dict:
        # No resolution binning: the pipeline samples at the size asked for, so image i depends only on the seed,
        # its prompt and i, and a merged pipeline given the same embeddings draws the same images.
        return {
            "prompt_embeds": text["prompt_embeds"].float(),
            "prompt_attention_mask": text["prompt_attention_mask"],
            "negative_prompt_embeds": negative["prompt_embeds"].float(),
            "negative_prompt_attention_mask": negative["prompt_attention_mask"],
            "negative_prompt": None,
            "guidance_scale": cfg_scale,
            "use_resolution_binning": False,
        }


def micro_conditions(model: nn.Module, x: torch.Tensor, base: PipelineBase | None) -> dict:
    """The 1024-MS α model's resolution and aspect-ratio conditions, as its pipeline passes them: the
    image's height and width in pixels, and height / width (None for the other models)."""
    if not model.use_additional_conditions:
        return {"resolution": None, "aspect_ratio": None}
    height, width = x.shape[-2] * base.vae_factor, x.shape[-1] * base.vae_factor
    resolution = torch.tensor([height, width], device=x.device, dtype=x.dtype).repeat(len(x), 1)
    aspect_ratio = torch.tensor([height / width], device=x.device, dtype=x.dtype).repeat(len(x), 1)
    return {"resolution": resolution, "aspect_ratio": aspect_ratio}


PIXART = PixArtFamily()
