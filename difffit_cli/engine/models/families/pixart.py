"""The PixArt family (PixArt-α and PixArt-Σ): diffusers' `PixArtTransformer2DModel`, text-conditional.

What DiffFit trains here (`--method difffit`):
- every bias except the timestep embedder's (`adaln_single.emb.*`: the timestep embedder, and the
  1024-MS α model's resolution and aspect-ratio embedders, the same kind of input embedder);
- each block's `scale_shift_table` and the final one: PixArt's per-block modulation is a table added
  to a shared projection of the timestep, so the table is the counterpart of DiT's adaLN bias;
- affine norm parameters where there are any (stock PixArt has none);
- gamma: one vector per residual branch (self-attention, cross-attention, MLP) of the first half of
  the blocks by default, multiplying the branch's output projection (`attn1.to_out.0`,
  `attn2.to_out.0`, `ff.net.2`) before the gated residual add. The projection is the last
  operation of each branch, so gamma there is exactly the paper's "scale the branch output", and
  it folds into that projection's weight and bias (W' = diag(gamma) W, b' = gamma * b): a merged
  model is a stock diffusers transformer. `branch+attn` adds gamma on the q, k and v projections.
gamma sits in `ScaledLinear`, a Linear subclass that shares the projection's own weight and bias and
multiplies its output: parameter names stay diffusers' (`...to_out.0.weight`), so fingerprints,
LoRA targets and state dicts are unchanged, and an untrained gamma (ones) changes no bit.

bitfit trains every bias and the modulation tables; full every parameter; lora peft's LoRA on the
attention projections (to_q, to_k, to_v, to_out.0 of both attentions, as diffusers' scripts do).

The loss is DiT's: PixArt predicts epsilon and a learned variance (8 output channels) on linear betas,
so the hybrid loss of engine/models/diffusion.py applies as it is (betas read off the pipeline's
scheduler config).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from difffit_cli.engine.devices import autocast_dtype
from difffit_cli.engine.errors import DiffFitError
from difffit_cli.engine.models.diffusion import GaussianDiffusion
from difffit_cli.engine.models.families.pixart_bases import TRANSFORMER_CLASSES, PixArtBase, load_pixart_base
from difffit_cli.engine.models.families.pixart_pipeline import (
    SCHEDULERS,
    pipeline_images,
    prompt_encoder,
    sampling_defaults,
    write_pixart_pipeline,
)
from difffit_cli.engine.models.family import Family, Setter, added_reference
from difffit_cli.engine.models.lora_names import PIXART_LORA

METHODS = ("full", "bitfit", "lora", "difffit")
BRANCHES = ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")  # the output projection of each residual branch
QKV = tuple(f"attn{i}.to_{x}" for i in (1, 2) for x in "qkv")
FROZEN_EMBEDDERS = "adaln_single.emb."  # timestep (and resolution / aspect-ratio) embedders
SCHEDULES = ("linear", "scaled_linear")
SHAPE_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "in_channels", "out_channels",
              "caption_channels", "cross_attention_dim", "use_additional_conditions")


class ScaledLinear(nn.Linear):
    """A Linear whose output is multiplied by `gamma_`: the projection's own weight and bias (shared,
    not copied) plus one trainable scale per output feature, ones at the start."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.gamma_ = nn.Parameter(torch.ones(linear.out_features, device=linear.weight.device,
                                              dtype=linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out * self.gamma_.to(out.dtype)


def _linear_at(block: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    parent, leaf = path.rsplit(".", 1)
    owner = block.get_submodule(parent)
    return owner, leaf, getattr(owner, leaf)


class PixArtFamily(Family):
    name = "pixart"
    title = "PixArt"
    conditioning = "text"
    methods = METHODS
    blocks = "transformer_blocks"
    groups = ("biases", "gamma", "modulation", "norms", "lora", "other")
    lora = PIXART_LORA
    schedulers = ("pipeline", *SCHEDULERS)  # "pipeline": the pipeline's own (PixArt's: dpm-solver)

    def owns(self, model: nn.Module) -> bool:
        return type(model).__name__ in TRANSFORMER_CLASSES and getattr(model, "config", {}).get("norm_type") \
            == "ada_norm_single"

    def load(self, spec: str, **options) -> PixArtBase:
        """`info=True`: the weights of a local folder are read (for its fingerprint), a Hub repo's never:
        its counts come from its config on the meta device."""
        return load_pixart_base(spec, weights=not options.get("info") or Path(spec).expanduser().is_dir())

    def describe(self, base: PixArtBase) -> dict:
        config = base.model.config
        return {
            "kind": "base", "spec": base.spec, "source_format": base.source_format, "pipeline": base.pipeline,
            "architecture": self.architecture(dict(config)),
            "total_params": sum(p.numel() for p in base.model.parameters()),
            "resolution": base.resolution, "latent_size": config.sample_size, **self.channels(config),
            "patch_size": config.patch_size,
            "max_text_tokens": base.max_text_tokens, "text_channels": config.caption_channels,
            "fingerprint": base.fingerprint, "vae": base.vae_spec if base.source_format != "config" else None,
            "hub_id": base.hub_id,
        }

    def config_of(self, model: nn.Module) -> dict:
        return {k: v for k, v in model.config.items() if not k.startswith("_")}

    def channels(self, config: dict) -> dict:
        channels = config["in_channels"]
        return {"in_channels": channels, "learn_sigma": config["out_channels"] == 2 * channels}

    def latent_size(self, config: dict) -> int:
        return config["sample_size"]

    def empty_model(self, config: dict) -> nn.Module:
        from diffusers import PixArtTransformer2DModel

        return PixArtTransformer2DModel(**config)

    def architecture(self, config: dict) -> str:
        depth, width = config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]
        size = {(28, 1152): "XL"}.get((depth, width), f"d{depth}-w{width}")
        return f"PixArt-{size}/{config['patch_size']}"

    def check_config(self, config: dict) -> None:
        for key in ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "sample_size",
                    "in_channels", "out_channels", "caption_channels"):
            if key not in config:
                raise TypeError(f"missing {key}")

    def is_trainable(self, name: str, method: str, new_classes: bool, norm_names: set[str]) -> bool:
        if method == "full":
            return True
        table = name.endswith("scale_shift_table")
        if method == "bitfit":
            return name.endswith(".bias") or table
        if method == "lora":
            return added_reference(name) is not None and ".gamma_" not in name
        return ((name.endswith(".bias") and not name.startswith(FROZEN_EMBEDDERS)) or table or ".gamma_" in name
                or name in norm_names)

    def parameter_group(self, name: str, norm_names: set[str]) -> str:
        return "modulation" if name.endswith("scale_shift_table") else super().parameter_group(name, norm_names)

    def prepare_conditioning(self, model: nn.Module, num_classes: int | None, new_classes: bool) -> bool:
        return False  # captions condition the model: nothing to resize

    def fits_adapter(self, model: nn.Module, meta) -> bool:
        mine = self.config_of(model)
        return all(mine.get(key) == meta.base_config.get(key) for key in SHAPE_KEYS)

    def shape_for_adapter(self, model: nn.Module, meta, setter: Setter) -> None:
        """Swap in the adapter's gamma modules through `setter` (the swapper puts the plain ones back)."""
        if meta.method == "difffit":
            self.add_gamma(model, meta.gamma_blocks, meta.settings.get("gamma_placement", "branch"), setter)

    def adopt_adapter(self, base: PixArtBase, meta) -> None:
        base.text_tokens = meta.training.get("max_text_tokens")

    def add_gamma(self, model: nn.Module, blocks: list[int], placement: str, setter: Setter = setattr) -> None:
        paths = BRANCHES + (QKV if placement == "branch+attn" else ())
        for i in blocks:
            for path in paths:
                owner, leaf, linear = _linear_at(model.transformer_blocks[i], path)
                if not isinstance(linear, ScaledLinear):
                    setter(owner, leaf, ScaledLinear(linear))

    def gamma_blocks(self, model: nn.Module) -> list[int]:
        return [i for i, block in enumerate(model.transformer_blocks)
                if isinstance(_linear_at(block, BRANCHES[0])[2], ScaledLinear)]

    @torch.no_grad()
    def fold_gamma(self, model: nn.Module) -> None:
        """Each ScaledLinear becomes a plain Linear holding gamma W and gamma b: new tensors, so a base
        whose projections an adapter shares is left as it was."""
        for name, module in list(model.named_modules()):
            if isinstance(module, ScaledLinear):
                gamma = module.gamma_.to(module.weight.dtype)
                folded = torch.nn.utils.skip_init(nn.Linear, module.in_features, module.out_features,
                                                  device=module.weight.device, dtype=module.weight.dtype)
                folded.weight = nn.Parameter(module.weight * gamma[:, None], module.weight.requires_grad)
                folded.bias = nn.Parameter(module.bias * gamma, module.bias.requires_grad)
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner), leaf, folded)

    def write_pipeline(self, base: PixArtBase, model: nn.Module, folder) -> None:
        write_pixart_pipeline(base, model, folder)

    def forward(self, model: nn.Module, base: PixArtBase | None):
        """`base` (its VAE factor) is needed only by the 1024-MS α model's pixel-size micro-conditions."""
        inner = getattr(model, "module", model)  # DDP wraps the model

        def call(x: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
            return model(x, encoder_hidden_states=text["prompt_embeds"].to(x.dtype),
                         encoder_attention_mask=text["prompt_attention_mask"], timestep=t,
                         added_cond_kwargs=micro_conditions(inner, x, base), return_dict=False)[0]

        return call

    def diffusion(self, base: PixArtBase) -> GaussianDiffusion:
        config = base.scheduler_config()
        schedule = config.get("beta_schedule", "linear")
        if schedule not in SCHEDULES or config.get("prediction_type", "epsilon") != "epsilon":
            raise DiffFitError(f"The base {base.spec} trains with a {schedule} {config.get('prediction_type')} "
                               "schedule; difffit trains PixArt's epsilon prediction on linear betas only.")
        start, end, steps = config.get("beta_start", 1e-4), config.get("beta_end", 0.02), \
            config.get("num_train_timesteps", 1000)
        if schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(start, end, steps, dtype=torch.float64)
        return GaussianDiffusion(num_train_steps=steps, betas=betas)

    def sampling_defaults(self, base: PixArtBase) -> dict:
        return sampling_defaults(base)

    def check_ready(self, base: PixArtBase) -> None:
        base.check_components()

    def text_key(self, base: PixArtBase, max_tokens: int) -> str:
        return f"{base.pipeline}\n{base.components.encoder_identity()}\nmax_tokens={max_tokens}"

    def prompt_encoder(self, base: PixArtBase, device: torch.device, max_tokens: int, what: str = "prompt"):
        # T5 v1.1 was trained in bf16, and fp16 overflows it: bf16 on a GPU (half of T5-XXL's fp32 18 GB).
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        return prompt_encoder(base, device, dtype, max_tokens, what)

    def sample_images(self, base: PixArtBase, text: dict, negative: dict, generators: list[torch.Generator],
                      options, device: torch.device):
        return pipeline_images(base, text, negative, generators, cfg_scale=options.cfg_scale, steps=options.steps,
                               scheduler=options.scheduler, width=options.width or base.resolution,
                               height=options.height or base.resolution, device=device,
                               autocast_dtype=autocast_dtype(options.mixed_precision))

    def set_gradient_checkpointing(self, model: nn.Module, enabled: bool) -> None:
        if enabled:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()


def micro_conditions(model: nn.Module, x: torch.Tensor, base: PixArtBase | None) -> dict:
    """The 1024-MS α model's resolution and aspect-ratio conditions, as its pipeline passes them: the
    image's height and width in pixels, and height / width (None for the other models)."""
    if not model.use_additional_conditions:
        return {"resolution": None, "aspect_ratio": None}
    height, width = x.shape[-2] * base.vae_factor, x.shape[-1] * base.vae_factor
    resolution = torch.tensor([height, width], device=x.device, dtype=x.dtype).repeat(len(x), 1)
    aspect_ratio = torch.tensor([height / width], device=x.device, dtype=x.dtype).repeat(len(x), 1)
    return {"resolution": resolution, "aspect_ratio": aspect_ratio}


PIXART = PixArtFamily()
