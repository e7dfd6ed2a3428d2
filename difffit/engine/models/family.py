"""A model family: what differs between DiT and the text-to-image transformers, as one small interface.

A family answers, for the models it owns: how a `--base` spec loads (and what `info` says of it),
which parameters each method trains, where DiffFit's scale factors gamma sit and how they fold
away, how the model is called on a noisy batch with its conditioning (class labels or text
embeddings), and the diffusion it trains with. The commands never test a family's name; they ask
the family of the base or adapter in hand (`engine.models.families.family_named`).

Implementations: `families/dit.py` (the reference DiT, class-conditional), and the text-conditional
diffusers families on `families/pipeline_family.py`: `pixart.py` (PixArt-α/Σ), `sd3.py` (Stable Diffusion
3 and 3.5) and `flux.py` (FLUX.1). A family is a loader, a handful of name rules and a forward call, never
a copy of a diffusers model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from difffit.engine.errors import DiffFitError
from difffit.engine.models.diffusion import GaussianDiffusion
from difffit.engine.models.flow_matching import FlowMatching
from difffit.engine.models.lora_names import LoraNames

Setter = Callable[[object, str, object], None]
# What `Family.forward` returns: fn(x_t, t, conditioning) -> the model's raw output.
ModelCall = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
# Every method, in the DiffFit paper's Table 1 order (benchmarks and examples/table1.py iterate over it).
METHODS = ("full", "adapter-parallel", "adapter-sequential", "bitfit", "vpt-deep", "lora", "difffit")
# Tensors a method adds (rather than changes), by name, and the value they have in the base model.
ADDED = {".gamma_": 1.0, ".lora_A.": 0.0, ".lora_B.": 0.0, ".adapter.": 0.0, ".prompts": 0.0}
ADDED_GROUPS = ("lora", "adapters", "prompts")  # info lists these only where a method has them
# The longest image side difffit trains at or draws, for every family: 65,536 tokens at patch 2 on an 8x VAE, far
# past any published checkpoint, and refused before anything is allocated for it.
MAX_SIDE = 4096


def added_reference(name: str) -> float | None:
    """The base value of a tensor a method adds (1 for gamma, 0 for LoRA, adapters, prompts); None for
    the base's own tensors."""
    return next((value for key, value in ADDED.items() if key in name), None)


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Names of affine norm parameters: LayerNorm, GroupNorm and RMS norms (torch's or diffusers' own,
    as SD3 and FLUX use on q/k). Stock DiT and PixArt have none; a model that adds them gets them trained."""
    return {
        f"{module_name}.{param_name}"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.LayerNorm | nn.GroupNorm) or type(module).__name__ == "RMSNorm"
        for param_name, _ in module.named_parameters(recurse=False)
    }


class Family:
    """The interface every family implements (the defaults are the ones most families share)."""

    name: str  # what adapter files record: "dit", "pixart"
    title: str  # for people: "DiT", "PixArt"
    conditioning: str  # "class" (labels, a class table, --class) or "text" (captions, prompts)
    methods: tuple[str, ...]  # the --method values it supports
    blocks: str  # the ModuleList attribute holding the transformer blocks
    class_table: str | None = None  # the class table's parameter name, for class-conditional families
    groups: tuple[str, ...]  # the `info` groups of its parameters, in order
    pipeline_tag: str = "text-to-image"  # the Hub task of its models
    schedulers: tuple[str, ...]  # the --scheduler names `sample` offers
    lora: LoraNames  # the --lora-targets names and the block modules they name
    # What `merge --format` offers (the first: the default).
    merge_formats: tuple[str, ...] = ("diffusers", "peft", "comfyui")
    pipeline_name: str = "diffusers pipeline"  # what its merged pipeline folder is, for messages
    # Text families' model cards: the extra arguments of the diffusers call, and when diffusers draws difffit's images.
    pipeline_call: dict = {"arguments": "", "same_images": "difffit samples through this same pipeline class: "
                           "given the same prompt, seed, steps and guidance, diffusers draws difffit's images."}
    prediction: str = "epsilon"  # what the model predicts: "epsilon" (DDPM, DiT and PixArt) or "flow" (SD3, FLUX)
    caption_dropout: float = 0.1  # text families: --caption-dropout's default (the family's convention)
    negative_prompts: bool = True  # text families: whether sampling has an unconditional branch to steer with
    max_text_tokens_limit: int | None = None  # text families: the most caption tokens its pipeline reads
    # True: the model takes its own square size only (DiT's fixed positional embedding), so no aspect-ratio
    # buckets and no --width/--height; False: any size whose sides are multiples of `size_multiple`.
    fixed_size: bool = False

    # -- loading and describing ---------------------------------------------------------------------

    def owns(self, model: nn.Module) -> bool:
        """Whether `model` is one of this family's models."""
        raise NotImplementedError

    def load(self, spec: str, **options: Any):
        """A loaded base (model on the CPU in fp32, eval mode, plus fingerprint, VAE and metadata)."""
        raise NotImplementedError

    def describe(self, base) -> dict:
        """The fields `difffit info --json` reports for a loaded base."""
        raise NotImplementedError

    def config_of(self, model: nn.Module) -> dict:
        """The JSON config an adapter records of a model (enough to rebuild it empty)."""
        raise NotImplementedError

    def empty_model(self, config: dict) -> nn.Module:
        """A model of `config` with uninitialised weights (call under `torch.device("meta")`)."""
        raise NotImplementedError

    def latent_size(self, config: dict) -> int:
        """The latent side length a config says the model was trained at."""
        raise NotImplementedError

    def architecture(self, config: dict) -> str:
        """A short name of the architecture a config describes."""
        raise NotImplementedError

    def check_config(self, config: dict) -> None:
        """Raise TypeError or ValueError when `config` is not one of this family's (adapter files)."""
        raise NotImplementedError

    def channels(self, config: dict) -> dict:
        """{"in_channels", "learn_sigma"} of a config, for `info`."""
        raise NotImplementedError

    def adapter_base_options(self, meta, spec: str) -> dict:
        """What `load` needs beyond the spec to rebuild the base an adapter (metadata `meta`) names."""
        return {}

    def depth(self, model: nn.Module) -> int:
        return len(getattr(model, self.blocks))

    @property
    def block_lists(self) -> tuple[str, ...]:
        """The ModuleLists holding the transformer blocks (FLUX has two: joint and single blocks)."""
        return (self.blocks,)

    # -- what a method trains -------------------------------------------------------------------------

    def is_trainable(self, name: str, method: str, new_classes: bool, norm_names: set[str]) -> bool:
        raise NotImplementedError

    def parameter_group(self, name: str, norm_names: set[str]) -> str:
        """Which `info` group (one of `groups`) a parameter belongs to."""
        if name == self.class_table:
            return "class_table"
        if ".gamma_" in name:
            return "gamma"
        if name in norm_names:
            return "norms"
        if ".lora_" in name:
            return "lora"
        if ".adapter." in name:
            return "adapters"
        if name.endswith(".prompts"):
            return "prompts"
        if name.endswith(".bias"):
            return "biases"
        return "other"

    def prepare_conditioning(self, model: nn.Module, num_classes: int | None, new_classes: bool) -> bool:
        """Shape the conditioning for the data (a new class table); returns whether the classes are new."""
        return False

    def fits_adapter(self, model: nn.Module, meta) -> bool:
        """Whether `model` (a loaded base) has the shapes an adapter's metadata `meta` needs."""
        raise NotImplementedError

    def shape_for_adapter(self, model: nn.Module, meta, setter: Setter) -> None:
        """Give `model` (a base that fits) the adapted model's shape, every change through `setter`
        (AdapterSwapper undoes them)."""
        raise NotImplementedError

    def adopt_adapter(self, base, meta) -> None:
        """What an applied adapter changes of the base besides tensors (DiT: class names; text families:
        the caption token count it was trained with)."""

    def add_gamma(self, model: nn.Module, blocks: list[int], placement: str, setter: Setter = setattr) -> None:
        """Add scale factors (ones) in `blocks`; `setter` lets AdapterSwapper remember what it replaced."""
        raise NotImplementedError

    def gamma_blocks(self, model: nn.Module) -> list[int]:
        raise NotImplementedError

    def fold_gamma(self, model: nn.Module) -> None:
        """Fold gamma into the output projections (gamma (W x + b) = (gamma W) x + gamma b) and drop it."""
        raise NotImplementedError

    def pipeline_problem(self, meta) -> str | None:
        """Why an adapter (metadata `meta`) cannot be merged into a diffusers pipeline; None: it can."""
        return None

    def write_pipeline(self, base, model: nn.Module, folder) -> None:
        """Write `model` (gamma and LoRA folded) as a diffusers pipeline folder that stock
        `DiffusionPipeline.from_pretrained` loads, atomically, with the base's other components."""
        raise NotImplementedError

    # -- training and sampling ------------------------------------------------------------------------

    def forward(self, model: nn.Module, base) -> ModelCall:
        """`fn(x_t, t, conditioning)` -> the raw model output (eps and variance channels) of `model`
        (the base's model, possibly wrapped for several processes)."""
        raise NotImplementedError

    def diffusion(self, base, timestep_sampling: str | None = None) -> GaussianDiffusion | FlowMatching:
        """The process the base was trained with: `draw(generator, batch, shape)` gives one micro-batch's
        timesteps and noise, `training_losses(model_fn, x0, t, noise, weights)` its loss. DiT and PixArt share
        the DDPM hybrid loss (uniform steps); SD3 and FLUX train by rectified flow (`FlowMatching`), drawing
        their timesteps as `timestep_sampling` says (fit refuses that option for the others)."""
        return GaussianDiffusion()

    def preview_sampling(self, base) -> dict:
        """fit's preview grids: sampling options over the defaults, kept cheap next to training."""
        return {}

    def sampling_defaults(self, base) -> dict:
        """What `sample` uses where the user gave nothing: {"cfg_scale", "scheduler"[, "steps"]}."""
        raise NotImplementedError

    # -- text-conditional families ------------------------------------------------------------------

    def check_ready(self, base) -> None:
        """Refuse, in one sentence, a base whose text encoder, tokenizer, VAE or scheduler is missing."""

    def text_token_limit(self, base=None) -> int | None:
        """The most caption tokens `base`'s pipeline reads (None: no bound known, e.g. without a base yet)."""
        return self.max_text_tokens_limit

    def text_key(self, base, max_tokens: int) -> str:
        """What cached text embeddings depend on besides the caption: encoder identity and token count."""
        raise NotImplementedError

    def prompt_encoder(self, base, device: torch.device, max_tokens: int, what: str = "prompt"):
        """`encode(texts) -> {name: (B, ...)}` on the CPU; the encoder loads on the first call, and
        `encode.report_truncated()` says in one line which of the texts so far were cut."""
        raise NotImplementedError

    def size_multiple(self, base) -> int:
        """The multiple of pixels every image side must be, for training buckets and for `sample --width /
        --height`: whole patches of latent pixels (VAE factor x patch size), and multiples of 8 px, which
        diffusers' pipelines ask for. A family that packs latents further (FLUX: 2 x 2) says so here."""
        return math.lcm(8, base.vae_factor * base.model.config.patch_size)

    def check_sample_size(self, base, width: int | None, height: int | None) -> None:
        """Refuse, in one sentence, an image size the family's pipeline cannot make."""
        for flag, value in (("--width", width), ("--height", height)):
            self.check_side(base, flag, value)

    def largest_side(self, base) -> int | None:
        """The longest image side the model takes, where it has one (None: any)."""
        return None

    def check_side(self, base, flag: str, value: int | None) -> None:
        """Refuse, in one sentence, an image side (given by `flag`) that is not a multiple of `size_multiple`,
        or that is longer than the model takes (`largest_side`) or than difffit draws (MAX_SIDE)."""
        if value is None:
            return
        step = self.size_multiple(base)
        if value % step:
            raise DiffFitError(f"{flag} {value} is not a multiple of {step} px, which {base.spec} needs.")
        largest = self.largest_side(base)
        if largest is not None and value > largest:
            raise DiffFitError(f"{flag} {value} is above {largest} px, the largest side {base.spec} takes (its "
                               "positional table's size).")
        if value > MAX_SIDE:
            raise DiffFitError(f"{flag} {value} is above {MAX_SIDE} px, the largest side difffit trains at or draws.")

    def sample_images(self, base, text: dict, negative: dict, generators: list[torch.Generator], options,
                      device: torch.device):
        """One batch of images (float in [0, 1], B x H x W x 3) for text rows `text`, through the family's pipeline."""
        raise NotImplementedError

    def set_gradient_checkpointing(self, model: nn.Module, enabled: bool) -> None:
        raise NotImplementedError

    def attention_shape(self, model: nn.Module) -> dict | None:
        """(heads, head_dim, tokens) for choosing the SDPA backend by measurement; None: leave it to SDPA."""
        return None

    def fp8_keep(self) -> tuple[str, ...] | None:
        """What stays bf16 under --mixed-precision fp8: fnmatch patterns over module names (the embedders,
        the modulation projections, the final layer); every other frozen Linear goes float8. None: fp8 is not
        supported on this family."""
        return None
