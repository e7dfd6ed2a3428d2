"""The setup phases of `fit`, each returning what it made: the inputs (the base at the run's resolution and
the scanned data, checked against each other), the data (latents, conditions, batches), the trainable state
(the method's modules, optimizer, EMA). `fit` (train.py) builds its `Run` once from their results.

The checks that need the base or the data live here, beside the phase that loads them; `FitConfig.validate`
checks the options alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from difffit.engine.data.batches import (
    MAX_EPOCH_ITEMS,
    Batches,
    BucketOrder,
    DataOrder,
    Split,
    epoch_size,
    item_repeats,
    step_seed,
)
from difffit.engine.data.buckets import Bucket, bucketed_latents, show_buckets
from difffit.engine.data.hf_datasets import open_data
from difffit.engine.data.images import ImageFolder, report_skipped, require_images, without_unreadable_classes
from difffit.engine.data.latents import CachedLatents, EncodedLatents, usable_latents
from difffit.engine.devices import AUTOCAST_DTYPES, one_builder_first
from difffit.engine.errors import DiffFitError
from difffit.engine.methods.trainable import (
    cast_frozen_matrices,
    describe_method,
    parse_gamma_blocks,
    prepare_model,
    trainable_parameters,
)
from difffit.engine.models.bases import Base
from difffit.engine.models.families import base_architecture
from difffit.engine.models.families.dit import DIT
from difffit.engine.models.family import BaseSpec, Family
from difffit.engine.models.fp8 import quantize_frozen_linears
from difffit.engine.models.resolution import move_to_resolution
from difffit.engine.models.speed import compile_blocks, make_optimizer, resolve_compile
from difffit.engine.training.conditions import Conditioning, check_text_tokens, prepare_conditions, with_captions
from difffit.engine.training.config import FitConfig
from difffit.engine.training.held_out import held_out_prompts, split_validation

if TYPE_CHECKING:
    from accelerate import Accelerator

    from difffit.engine.models.dit import DiTConfig

Latents = CachedLatents | EncodedLatents
MEMORY_HINT = (
    "--grad-checkpointing recomputes activations; --mixed-precision bf16 halves the frozen weights, and "
    "fp8 (on an FP8 GPU) halves them again."
)


# -- checks that need the base or the data --------------------------------------------------------------


def check_architecture(config: FitConfig, architecture: DiTConfig | dict | None, family: Family = DIT) -> None:
    """Refuse method settings the base cannot hold (a LoRA rank above its layers' width, more prompts than
    image tokens, ...) before anything is allocated for them. `architecture`: the config of a `family` base
    (None: not known yet)."""
    if architecture is not None:
        describe_method(
            architecture,
            config.method,
            gamma_blocks=config.gamma_blocks,
            settings=config.method_settings,
            family=family,
        )


def check_base_shapes(config: FitConfig) -> None:
    """`check_architecture` from the options alone, where the base's shapes are cheap to read without loading it
    (`base_architecture`: a random: name, the tiny base, a local .safetensors file); other bases are checked
    once loaded."""
    check_architecture(
        config, base_architecture(config.base, resolution=config.resolution, vae=config.vae, num_heads=config.num_heads)
    )


def check_data(config: FitConfig, folder: ImageFolder) -> None:
    """Bounds that need the training data, checked as soon as it is scanned: the epoch that --repeats makes,
    and the batch against it."""
    repeats = item_repeats(config.repeats, folder.labels, folder.class_names)
    epoch = epoch_size(folder.labels, repeats, config.class_balance)
    if epoch > max(len(folder), MAX_EPOCH_ITEMS):
        raise DiffFitError(
            f"`repeats` makes an epoch of {epoch:,} items; the limit is {MAX_EPOCH_ITEMS:,} "
            "(an epoch is shuffled in memory).",
            hint="Use a smaller --repeats.",
        )
    if config.batch_size > epoch:
        raise DiffFitError(
            f"--batch-size {config.batch_size} is larger than the {epoch:,} images of an epoch, "
            "so every step would repeat images.",
            hint=f"Use --batch-size {epoch} or less, or more images (or --repeats).",
        )


# -- the inputs: base and data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """The base at the run's resolution and the data it trains on, checked against each other."""

    base: Base
    base_config: dict  # the base's config before any move to another resolution: what the adapter records
    pos_embed: str  # "standard", or the mode the base was moved to a new resolution with
    folder: ImageFolder  # the training items
    val_folder: ImageFolder | None  # the held-out items


def open_inputs(config: FitConfig, base: Base | None, spec: BaseSpec | None, family: Family) -> Inputs:
    """Scan the data, load the base (unless given) and move it to the run's resolution. The data is scanned
    before the base loads; a class-conditional run's held-out set is drawn (and the rest checked) then too, a
    text-to-image run's once the base is loaded, whose patch and VAE decide its bucket shapes. `spec`: the
    resolved --base, when no loaded `base` is given."""
    data = open_data(config.data, config.image_column, config.label_column, config.caption_column)
    folder = with_captions(data, config, family)
    if family.conditioning != "text":
        folder, val_folder = split_validation(config, folder)
        check_data(config, folder)
    base, base_config, pos_embed = load_base_at_resolution(config, base, spec, family)
    family.check_ready(base)
    check_text_tokens(config, family, base)
    if family.conditioning == "text":
        folder, val_folder = split_validation(config, folder, family, base)
        check_data(config, folder)
    check_architecture(config, family.config_of(base.model), family)  # before the method's modules exist
    return Inputs(base, base_config, pos_embed, folder, val_folder)


def load_base_at_resolution(
    config: FitConfig, base: Base | None, spec: BaseSpec | None, family: Family
) -> tuple[Base, dict, str]:
    """(base of `family` at the run's resolution, its config before any move, positional mode)."""
    if base is None:
        # --resolution sizes a random base; any other base keeps its own and is moved below.
        sized = spec.source == "random"
        base = family.load(
            spec, resolution=config.resolution if sized else None, vae=config.vae, num_heads=config.num_heads
        )
    base_config, pos_embed = family.config_of(base.model), "standard"
    # A positional mode asks for a move (upscale-res sets one), and a move must go up: --to 32 on a 32 px base
    # is refused there, not trained at 32 px.
    moved = config.resolution is not None and (config.resolution != base.resolution or config.pos_embed)
    if family.fixed_size and moved:
        pos_embed = config.pos_embed or "trick"
        base = move_to_resolution(base, config.resolution, pos_embed)
    elif not family.fixed_size:  # a text-to-image transformer trains at any size as it is
        family.check_side(base, "--resolution", config.resolution)
    return base, base_config, pos_embed


# -- the data -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """The usable training items as batches of latents and conditions."""

    folder: ImageFolder  # the usable items (unreadable images and their emptied classes left out)
    batches: Batches
    buckets: list[Bucket] | None  # with --buckets auto: the aspect-ratio buckets of the training data
    cache: str | None  # the latents' cache file
    conditioning: Conditioning


def prepare_data(config: FitConfig, accelerator: Accelerator, inputs: Inputs, family: Family, progress: bool) -> Data:
    """Latents for every usable image (cached, or a VAE encoding them each step), square or in aspect-ratio
    buckets; their conditions; the data order."""
    base, device, main = inputs.base, accelerator.device, accelerator.is_main_process
    split = Split(config.batch_size, config.grad_accum, accelerator.process_index, accelerator.num_processes)
    num_workers = config.num_workers if config.num_workers is not None else min(8, os.cpu_count() or 1)
    resolution = config.resolution or base.resolution

    def latents_for(images: ImageFolder, size: int | tuple[int, int]) -> tuple[ImageFolder, Latents]:
        # usable images, and their latents cropped to size (a side or a bucket)
        return usable_latents(
            images,
            size,
            base.vae_spec,
            base.vae,
            cache=config.cache_latents,
            cache_dir=config.cache_dir,
            batch_size=split.per_process,
            device=device,
            num_workers=num_workers,
            progress=progress,
        )

    bucketed = config.bucketed(family)
    with one_builder_first(accelerator):  # process 0 encodes; the others wait, then open the finished cache
        if bucketed:
            folder, latents = bucketed_latents(
                inputs.folder,
                resolution,
                family.size_multiple(base),
                config.batch_size,
                latents_for,
                progress,
                family.largest_side(base),
            )
        else:
            folder, latents = latents_for(inputs.folder, resolution)
    if main:
        report_skipped(folder.skipped, len(inputs.folder.files))
    require_images(folder)
    folder = without_unreadable_classes(folder, inputs.folder, announce=main)
    held_out = held_out_prompts(config, inputs.val_folder) if family.conditioning == "text" else []
    # labels, or caption embeddings (the encoder freed after)
    conditioning = prepare_conditions(config, accelerator, base, family, folder, held_out, progress)
    repeats = item_repeats(config.repeats, folder.labels, folder.class_names)
    buckets = latents.buckets if bucketed else None
    if bucketed:
        if main:
            show_buckets(buckets, config.batch_size)
        order = BucketOrder([bucket.members for bucket in buckets], folder.labels, config.seed, repeats)
    else:
        order = DataOrder(folder.labels, config.seed, repeats, config.class_balance)
    batches = Batches(latents, conditioning.conditions, split, order, device)
    cache = None if latents.cache_path is None else str(latents.cache_path)
    return Data(folder, batches, buckets, cache, conditioning)


# -- the trainable state ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trainable:
    """The model as the method trains it, and what the optimizer and the adapter file need of it."""

    model: torch.nn.Module  # prepared by the accelerator
    optimizer: torch.optim.Optimizer
    params: dict[str, torch.nn.Parameter]  # the trained tensors, by name
    base_state: dict[str, torch.Tensor]  # their values before training (the adapter stores the difference)
    ema: dict[str, torch.Tensor]  # their EMA ({} without --ema)


def prepare_trainable_state(
    config: FitConfig, accelerator: Accelerator, precision: str, base: Base, family: Family, data: Data
) -> Trainable:
    """Freeze and unfreeze as the method says; optimizer and EMA over the trained tensors only."""
    model, device = base.model, accelerator.device
    gamma_blocks = parse_gamma_blocks(config.gamma_blocks, family.depth(model)) if config.method == "difffit" else None
    torch.manual_seed(step_seed(config.seed, 0xADD))  # the added modules' init (LoRA A, adapters, prompts)
    prepare_model(
        model,
        config.method,
        gamma_blocks,
        len(data.folder.class_names),
        new_classes=data.conditioning.new_classes,
        settings=config.method_settings,
    )
    base_state = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    # float8 matmuls, quantized from the weights as loaded and before the move: the device never holds the bf16 copy
    if precision == "fp8" and not quantize_frozen_linears(model, keep=family.fp8_keep()):
        raise DiffFitError(
            f"--method {config.method} trains every weight matrix, so fp8 has nothing frozen to speed up.",
            hint="Use --mixed-precision bf16.",
        )
    if (dtype := AUTOCAST_DTYPES.get(precision)) is not None:
        cast_frozen_matrices(model, dtype)  # same matmuls as autocast, half the weight memory
    family.set_gradient_checkpointing(model, config.grad_checkpointing)
    try:
        model.to(device).train()
    except torch.OutOfMemoryError:
        raise DiffFitError(
            f"The {family.title} model does not fit in the memory of {device} (--mixed-precision {precision}).",
            hint=MEMORY_HINT,
        ) from None
    if resolve_compile(config.compile, device):
        # One graph per block shape, fixed batch: no recompiles; with several bucket shapes, torch's automatic
        # dynamic shapes instead of one static graph per bucket (past its recompile limit, eager).
        dynamic = None if data.buckets and len(data.buckets) > 1 else False
        for blocks in family.block_lists:  # FLUX: its joint blocks and its single blocks
            compile_blocks(model, blocks=blocks, dynamic=dynamic)
    params = trainable_parameters(model)
    optimizer = make_optimizer(params.values(), config.learning_rate(), device)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = {n: p.detach().float().clone() for n, p in params.items()} if config.ema else {}
    return Trainable(model, optimizer, params, base_state, ema)
