"""A model family: what differs between DiT and the text-to-image transformers, as one small interface.

`Family` is what every family answers, for the models it owns: how a resolved `--base` spec loads (and what
`info` says of it), which parameters each method trains, where DiffFit's scale factors gamma sit (data: a
`GammaPlacement`, which adds, finds and folds them), how the model is called on a noisy batch with its
conditioning, the diffusion it trains with, and how it samples and merges. Capabilities only some families
have are mixins, absent elsewhere: `TextConditioning` (captions and prompts, sampling through a pipeline)
and `FreeSize` (any image size: aspect-ratio buckets, `sample --width/--height`). The commands never test a
family's name; they ask the family of the base or adapter in hand (`engine.models.families`).

Implementations: `families/dit.py` (the reference DiT, class-conditional), and the diffusers text-to-image
families on `families/text_family.py`: `pixart.py` (PixArt-α/Σ), `sd3.py` (SD3/3.5) and `flux.py` (FLUX.1).
A family is a loader, a handful of name rules and a forward call, never a copy of a diffusers model.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from difffit.engine.errors import DiffFitError
from difffit.engine.models.diffusion import GaussianDiffusion
from difffit.engine.models.flow_matching import FlowMatching
from difffit.engine.models.gamma import GammaPlacement, Setter
from difffit.engine.models.lora_names import LoraNames

if TYPE_CHECKING:  # types only: the loaded bases, adapter files and sampling options sit above this interface
    from difffit.engine.evaluation.sample import SamplingOptions
    from difffit.engine.methods.adapter import AdapterMeta
    from difffit.engine.models.bases import Base
    from difffit.engine.models.families.pipeline_bases import PipelineBase

    LoadedBase = Base | PipelineBase

__all__ = [
    "ADDED",
    "METHODS",
    "BaseSpec",
    "Family",
    "FreeSize",
    "ModelCall",
    "Setter",
    "TextConditioning",
    "added_reference",
    "norm_parameter_names",
]
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


@dataclass(frozen=True)
class BaseSpec:
    """A `--base` spec read once (`families.resolve_base`): its family, and where its files are."""

    spec: str  # as given: messages and records name it
    family: Family
    source: str  # "random", "bundled" (the tiny base), "alias", "file", "folder" or "hub"
    path: Path | None = None  # a local file or folder; a Hub repo's snapshot of its configs
    repo_id: str | None = None  # the Hub repo of a DiT alias or a Hub id


class Family(ABC):
    """What every family answers. Its data first, then what it must implement, then what it shares."""

    name: str  # what adapter files record: "dit", "pixart"
    title: str  # for people: "DiT", "PixArt"
    conditioning: str  # "class" (labels, a class table, --class) or "text" (captions, prompts)
    methods: tuple[str, ...]  # the --method values it supports
    groups: tuple[str, ...]  # the `info` groups of its parameters, in order
    schedulers: tuple[str, ...]  # the --scheduler names `sample` offers
    lora: LoraNames  # the --lora-targets names and the block modules they name
    gamma: GammaPlacement  # where DiffFit's gamma sits, per block list (FLUX has two: joint and single blocks)
    class_table: str | None = None  # the class table's parameter name, for class-conditional families
    pipeline_tag: str = "text-to-image"  # the Hub task of its models
    merge_formats: tuple[str, ...] = ("diffusers", "peft", "comfyui")  # what `merge --format` offers (first: default)
    pipeline_name: str = "diffusers pipeline"  # what its merged pipeline folder is, for messages
    prediction: str = "epsilon"  # what the model predicts: "epsilon" (DDPM: DiT and PixArt) or "flow" (SD3, FLUX)
    # True: the model takes its own square size only (DiT's fixed positional embedding); `FreeSize` families
    # take any size whose sides are multiples of `size_multiple`.
    fixed_size: bool = True
    # What stays bf16 under --mixed-precision fp8: fnmatch patterns over module names (the embedders, the
    # modulation projections, the final layer); every other frozen Linear goes float8. None: no fp8.
    keep_bf16: tuple[str, ...] | None = None

    # -- loading and describing ---------------------------------------------------------------------

    @abstractmethod
    def owns(self, model: nn.Module) -> bool:
        """Whether `model` is one of this family's models."""

    @abstractmethod
    def load(self, base: BaseSpec, **options: Any) -> LoadedBase:
        """A loaded base (model on the CPU in fp32, eval mode, plus fingerprint, VAE and metadata)."""

    @abstractmethod
    def describe(self, base: LoadedBase) -> dict:
        """The fields `difffit info --json` reports for a loaded base."""

    @abstractmethod
    def config_of(self, model: nn.Module) -> dict:
        """The JSON config an adapter records of a model (enough to rebuild it empty)."""

    @abstractmethod
    def empty_model(self, config: dict) -> nn.Module:
        """A model of `config` with uninitialised weights (call under `torch.device("meta")`)."""

    @abstractmethod
    def latent_size(self, config: dict) -> int:
        """The latent side length a config says the model was trained at."""

    @abstractmethod
    def architecture(self, config: dict) -> str:
        """A short name of the architecture a config describes."""

    @abstractmethod
    def check_config(self, config: dict) -> None:
        """Raise TypeError or ValueError when `config` is not one of this family's (adapter files)."""

    @abstractmethod
    def channels(self, config: dict) -> dict:
        """{"in_channels", "learn_sigma"} of a config, for `info`."""

    # -- what a method trains, and adapters -----------------------------------------------------------

    @abstractmethod
    def is_trainable(self, name: str, method: str, new_classes: bool, norm_names: set[str]) -> bool:
        """Whether `method` trains the parameter `name` (`new_classes`: the data brings a new class table)."""

    @abstractmethod
    def fits_adapter(self, model: nn.Module, meta: AdapterMeta) -> bool:
        """Whether `model` (a loaded base) has the shapes an adapter's metadata `meta` needs."""

    @abstractmethod
    def shape_for_adapter(self, model: nn.Module, meta: AdapterMeta, setter: Setter) -> None:
        """Give `model` (a base that fits) the adapted model's shape, every change through `setter`
        (AdapterSwapper undoes them)."""

    @abstractmethod
    def write_pipeline(self, base: LoadedBase, model: nn.Module, folder: Path) -> None:
        """Write `model` (gamma and LoRA folded) as a diffusers pipeline folder that stock
        `DiffusionPipeline.from_pretrained` loads, atomically, with the base's other components."""

    # -- training and sampling ------------------------------------------------------------------------

    @abstractmethod
    def forward(self, model: nn.Module, base: LoadedBase) -> ModelCall:
        """`fn(x_t, t, conditioning)` -> the raw model output of `model` (the base's model, possibly wrapped
        for several processes)."""

    @abstractmethod
    def sampling_defaults(self, base: LoadedBase) -> dict:
        """What `sample` uses where the user gave nothing: {"cfg_scale", "scheduler"[, "steps"]}."""

    @abstractmethod
    def check_sample_size(self, base: LoadedBase, width: int | None, height: int | None) -> None:
        """Refuse, in one sentence, an image size (`sample --width/--height`) the family cannot make."""

    @abstractmethod
    def set_gradient_checkpointing(self, model: nn.Module, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass (or stop doing so)."""

    # -- shared: blocks and gamma, from `gamma` -------------------------------------------------------

    @property
    def block_lists(self) -> tuple[str, ...]:
        """The ModuleLists holding the transformer blocks, in the order the image passes through them."""
        return self.gamma.block_lists

    def depth(self, model: nn.Module) -> int:
        """The number of blocks, across the block lists (what `--gamma-blocks` counts)."""
        return len(self.gamma.blocks(model))

    def add_gamma(self, model: nn.Module, blocks: list[int], placement: str, setter: Setter = setattr) -> None:
        """Add scale factors (ones) in `blocks`; `setter` lets AdapterSwapper remember what it replaced."""
        self.gamma.add(model, blocks, placement, setter)

    def gamma_blocks(self, model: nn.Module) -> list[int]:
        return self.gamma.blocks_with_gamma(model)

    def fold_gamma(self, model: nn.Module) -> None:
        """Fold gamma into the output projections (gamma (W x + b) = (gamma W) x + gamma b) and drop it."""
        self.gamma.fold(model)

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

    # -- shared defaults, which a family overrides where it differs -----------------------------------

    def adapter_base_options(self, meta: AdapterMeta, spec: str) -> dict:
        """What `load` needs beyond the spec to rebuild the base an adapter (metadata `meta`) names."""
        return {}

    def prepare_conditioning(self, model: nn.Module, num_classes: int | None, new_classes: bool) -> bool:
        """Shape the conditioning for the data (a new class table); returns whether the classes are new."""
        return False

    def adopt_adapter(self, base: LoadedBase, meta: AdapterMeta) -> None:
        """What an applied adapter changes of the base besides tensors (DiT: class names; text families:
        the caption token count it was trained with); nothing by default."""
        return None

    def pipeline_problem(self, meta: AdapterMeta) -> str | None:
        """Why an adapter (metadata `meta`) cannot be merged into a diffusers pipeline; None: it can."""
        return None

    def check_ready(self, base: LoadedBase) -> None:
        """Refuse, in one sentence, a base missing a part training needs (text families: their encoders); a
        base that is its model alone (DiT) has nothing more to check."""
        return None

    def diffusion(self, base: LoadedBase, timestep_sampling: str | None = None) -> GaussianDiffusion | FlowMatching:
        """The process the base was trained with: `draw(generator, batch, shape)` gives one micro-batch's
        timesteps and noise, `training_losses(model_fn, x0, t, noise, weights)` its loss. DiT and PixArt share
        the DDPM hybrid loss (uniform steps); SD3 and FLUX train by rectified flow (`FlowMatching`), drawing
        their timesteps as `timestep_sampling` says (fit refuses that option for the others)."""
        return GaussianDiffusion()

    def preview_sampling(self, base: LoadedBase) -> dict:
        """fit's preview grids: sampling options over the defaults, kept cheap next to training."""
        return {}

    def attention_shape(self, model: nn.Module) -> dict | None:
        """(heads, head_dim, tokens) for choosing the SDPA backend by measurement; None: leave it to SDPA."""
        return None

    def fp8_keep(self) -> tuple[str, ...] | None:
        return self.keep_bf16


class TextConditioning(ABC):
    """A family conditioned on text: captions at training, prompts at sampling, both encoded by its pipeline's
    text encoders, and images drawn through that pipeline."""

    conditioning = "text"
    caption_dropout: float = 0.1  # --caption-dropout's default (the family's convention)
    negative_prompts: bool = True  # whether sampling has an unconditional branch to steer with
    max_text_tokens_limit: int | None = None  # the most caption tokens its pipeline reads, where fixed
    # Model cards: the extra arguments of the diffusers call, and when diffusers draws difffit's images.
    pipeline_call: dict = {
        "arguments": "",
        "same_images": "difffit samples through this same pipeline class: "
        "given the same prompt, seed, steps and guidance, diffusers draws difffit's images.",
    }

    def text_token_limit(self, base: LoadedBase | None = None) -> int | None:
        """The most caption tokens `base`'s pipeline reads (None: no bound known, e.g. without a base yet)."""
        return self.max_text_tokens_limit

    @abstractmethod
    def text_key(self, base: LoadedBase, max_tokens: int) -> str:
        """What cached text embeddings depend on besides the caption: encoder identity and token count."""

    @abstractmethod
    def prompt_encoder(self, base: LoadedBase, device: torch.device, max_tokens: int, what: str = "prompt") -> Any:
        """`encode(texts) -> {name: (B, ...)}` on the CPU; the encoder loads on the first call, and
        `encode.report_truncated()` says in one line which of the texts so far were cut."""

    @abstractmethod
    def sample_images(
        self,
        base: LoadedBase,
        text: dict,
        negative: dict,
        generators: list[torch.Generator],
        options: SamplingOptions,
        device: torch.device,
    ) -> np.ndarray:
        """One batch of images (float in [0, 1], B x H x W x 3) for text rows `text`, through the pipeline."""


class FreeSize:
    """A family whose model takes any image size whose sides are multiples of `size_multiple`, up to
    `largest_side`: it trains in aspect-ratio buckets and samples at `--width` x `--height`."""

    fixed_size = False

    def size_multiple(self, base: LoadedBase) -> int:
        """The multiple of pixels every image side must be: whole patches of latent pixels (VAE factor x patch
        size), and multiples of 8 px, which diffusers' pipelines ask for. A family that packs latents further
        (FLUX: 2 x 2) says so here."""
        return math.lcm(8, base.vae_factor * base.model.config.patch_size)

    def largest_side(self, base: LoadedBase) -> int | None:
        """The longest image side the model takes, where it has one (None: any)."""
        return None

    def check_sample_size(self, base: LoadedBase, width: int | None, height: int | None) -> None:
        for flag, value in (("--width", width), ("--height", height)):
            self.check_side(base, flag, value)

    def check_side(self, base: LoadedBase, flag: str, value: int | None) -> None:
        """Refuse, in one sentence, an image side (given by `flag`) that is not a multiple of `size_multiple`,
        or that is longer than the model takes (`largest_side`) or than difffit draws (MAX_SIDE)."""
        if value is None:
            return
        step = self.size_multiple(base)
        if value % step:
            raise DiffFitError(f"{flag} {value} is not a multiple of {step} px, which {base.spec} needs.")
        largest = self.largest_side(base)
        if largest is not None and value > largest:
            raise DiffFitError(
                f"{flag} {value} is above {largest} px, the largest side {base.spec} takes (its "
                "positional table's size)."
            )
        if value > MAX_SIDE:
            raise DiffFitError(f"{flag} {value} is above {MAX_SIDE} px, the largest side difffit trains at or draws.")
