"""What a fit run is asked to do (FitConfig, checked once before any work) and what it did (FitResult)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from difffit.engine.data.batches import MAX_EPOCH_ITEMS
from difffit.engine.data.captions import check_template
from difffit.engine.data.hf_datasets import HF_PREFIX, hub_dataset
from difffit.engine.devices import DEVICES
from difffit.engine.errors import DiffFitError, require_at_least, require_at_most, require_seed
from difffit.engine.evaluation.options import check_image_count
from difffit.engine.io import check_folder_path
from difffit.engine.models.family import MAX_SIDE, METHODS
from difffit.engine.models.flow_matching import TIMESTEP_SAMPLING
from difffit.engine.models.resolution import PE_MODES
from difffit.engine.models.speed import COMPILE_CHOICES
from difffit.engine.training.options import FitFields

if TYPE_CHECKING:
    from difffit.engine.models.family import Family

MIXED_PRECISION = ("auto", "no", "fp16", "bf16", "fp8")
ADAPTER_DTYPES = ("fp16", "fp32")
KEEP_BEST = ("fid", "clip", "val_loss")
EVAL_METRICS = ("fid", "clip")  # in-training: FID (with KID where the reference has features), CLIP score
BUCKETS = ("auto", "none")
MAX_STEPS = 100_000_000  # DiT-XL/2 trained 7M steps; the step count sizes the run's schedule


@dataclass
class FitConfig(FitFields):
    """What a fit run is asked to do: FitFields (every option, with its default), checked by `validate`."""

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.method == "full" else 1e-3)

    def out_dir(self) -> Path:
        return Path(self.out).expanduser() if self.out else default_out_dir(self.data, self.method)

    def validate(self) -> FitConfig:
        """Check every option before any work starts, one sentence per problem: what the options alone decide
        (the checks that need the base or the data are engine.training.setup's). Returns self."""
        _choice("--method", self.method, METHODS)
        _choice("--device", self.device, DEVICES, prefix_ok="cuda:")
        _choice("--mixed-precision", self.mixed_precision, MIXED_PRECISION)
        _choice("--adapter-dtype", self.adapter_dtype, ADAPTER_DTYPES)
        _choice("--compile", self.compile, COMPILE_CHOICES)
        if self.buckets is not None:
            _choice("--buckets", self.buckets, BUCKETS)
        if self.pos_embed is not None:
            _choice("--pe", self.pos_embed, PE_MODES)
        if self.data is None:
            raise DiffFitError("No training data given.", hint="Pass a DATA folder or a --recipe with `data`.")
        if self.base is None:
            raise DiffFitError("No base model given.", hint="Pass --base, e.g. --base DiT-XL/2-256.")
        for name in ("steps", "batch_size", "keep", "log_every", "grad_accum"):
            _at_least(name, getattr(self, name), 1)
        require_at_most("--steps", self.steps, MAX_STEPS, "years of training at any speed")
        require_seed("--seed", self.seed)
        for name in ("save_every", "sample_every", "warmup"):
            _at_least(name, getattr(self, name), 0)
        for name in ("resolution", "num_heads"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        if self.resolution is not None and self.resolution > MAX_SIDE:
            raise DiffFitError(f"{self.resolution} px is beyond the largest supported resolution, {MAX_SIDE} px.")
        if self.num_workers is not None:
            _at_least("num_workers", self.num_workers, 0)
            require_at_most("--num-workers", self.num_workers, os.cpu_count() or 1, "this machine's CPU cores")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise DiffFitError(f"--lr must be a positive number (got {self.lr}).")
        if not (math.isfinite(self.ema_decay) and 0.0 <= self.ema_decay < 1.0):
            raise DiffFitError(f"--ema-decay must be in [0, 1) (got {self.ema_decay}).")
        if self.cache_dir is not None:
            check_folder_path(self.cache_dir, "--cache-dir")
        self._validate_data_and_validation()
        self.method_settings.validate()
        return self

    def _validate_data_and_validation(self) -> None:
        for name in ("val_every", "eval_every"):
            _at_least(name, getattr(self, name), 0)
        if self.eval_n is not None:
            _at_least("eval_n", self.eval_n, 2)
            check_image_count("--eval-n", self.eval_n)
        counts = self.repeats.values() if isinstance(self.repeats, dict) else [self.repeats]
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in counts):
            raise DiffFitError(f"`repeats` must be an integer >= 1 or a table of class = integer (got {self.repeats}).")
        if (most := max(counts, default=1)) > MAX_EPOCH_ITEMS:
            raise DiffFitError(
                f"--repeats {most:,} is above the limit of {MAX_EPOCH_ITEMS:,} items per epoch "
                "(an epoch is shuffled in memory)."
            )
        for spec in (self.data, self.val_data):
            if spec is not None and spec.startswith(HF_PREFIX):
                hub_dataset(spec)
        check_template(self.caption_template)
        if self.timestep_sampling is not None:
            _choice("--timestep-sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        if self.caption_dropout is not None and not (
            math.isfinite(self.caption_dropout) and 0.0 <= self.caption_dropout < 1.0
        ):
            raise DiffFitError(f"--caption-dropout must be in [0, 1) (got {self.caption_dropout}).")
        if self.max_text_tokens is not None:
            _at_least("max_text_tokens", self.max_text_tokens, 1)
        for name in ("snr_gamma", "p2_gamma"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise DiffFitError(f"--{name.replace('_', '-')} must be a positive number (got {value}).")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DiffFitError(f"--val-fraction must be in [0, 1) (got {self.val_fraction}).")
        if self.val_fraction and self.val_data:
            raise DiffFitError("--val-fraction and --val-data both name a validation set; give one.")
        has_val = bool(self.val_fraction or self.val_data)
        if self.val_every and not has_val:
            raise DiffFitError("--val-every needs a validation set.", hint="Add --val-fraction 0.1 or --val-data DIR.")
        metrics = self.evaluation_metrics()
        if self.clip_model is not None and "clip" not in metrics:
            raise DiffFitError("--clip-model is the model of the clip metric; add clip to --eval-metrics.")
        if self.eval_every and "fid" in metrics and not (self.eval_reference or has_val):
            raise DiffFitError(
                "--eval-every needs --eval-reference (an image folder or a statistics .npz) or a "
                "validation set to compare samples with.",
                hint="Add --eval-reference DIR, or --val-fraction 0.1 on a text-to-image base.",
            )
        if self.keep_best is not None:
            _choice("--keep-best", self.keep_best, KEEP_BEST)
            if self.keep_best in EVAL_METRICS and self.keep_best not in metrics:
                raise DiffFitError(
                    f"--keep-best {self.keep_best} keeps the best {self.keep_best} score, and "
                    f"--eval-metrics {self.eval_metrics} does not compute it.",
                    hint=f"Add {self.keep_best} to --eval-metrics.",
                )
            if self.keep_best in EVAL_METRICS and not self.eval_every:
                raise DiffFitError(f"--keep-best {self.keep_best} needs --eval-every N.")
            if self.keep_best == "val_loss" and not has_val:
                raise DiffFitError("--keep-best val_loss needs a validation set (--val-fraction or --val-data).")

    def evaluation_metrics(self) -> tuple[str, ...]:
        """--eval-metrics parsed and checked, in EVAL_METRICS order."""
        names = [name.strip().lower() for name in self.eval_metrics.split(",") if name.strip()]
        unknown = [name for name in names if name not in EVAL_METRICS]
        if unknown or not names:
            raise DiffFitError(
                f"Unknown --eval-metrics {unknown[0] if unknown else '(none)'!r}; choose from "
                f"{', '.join(EVAL_METRICS)}."
            )
        return tuple(name for name in EVAL_METRICS if name in names)

    def bucketed(self, family: Family) -> bool:
        """Whether the run groups images into aspect-ratio buckets: --buckets, else the family's default."""
        return (self.buckets or ("none" if family.fixed_size else "auto")) == "auto"

    def loss_weighting(self) -> dict[str, float]:
        """The weighting of the MSE term, as the adapter's training summary records it ({} for none)."""
        return {k: v for k, v in (("snr_gamma", self.snr_gamma), ("p2_gamma", self.p2_gamma)) if v is not None}


def _choice(option: str, value: str, allowed: tuple[str, ...], prefix_ok: str | None = None) -> None:
    if value in allowed or (prefix_ok and isinstance(value, str) and value.startswith(prefix_ok)):
        return
    raise DiffFitError(f"Unknown {option} {value!r}; choose one of {', '.join(allowed)}.")


def _at_least(name: str, value: int, low: int) -> None:
    require_at_least(f"--{name.replace('_', '-')}", value, low)


def default_out_dir(data: str | None, method: str) -> Path:
    """runs/<data folder>-<method>; for hf:OWNER/NAME[:split], runs/NAME-split-<method>."""
    if data and data.startswith(HF_PREFIX):
        name = re.sub(r"[^\w.-]+", "-", data[len(HF_PREFIX) :].rsplit("/", 1)[-1]).strip("-")
    else:
        name = Path(data).expanduser().resolve().name if data else "run"
    return Path("runs") / f"{name}-{method}"


@dataclass
class FitResult:
    """What `fit` returns (and `difffit fit --json` prints): the run folder and its adapter file (None before the
    first save), the steps done and asked for, the last loss, the data seen and skipped, the speed, and whether
    and why the run stopped early."""

    out_dir: Path
    adapter: Path | None
    step: int
    start_step: int
    steps: int
    loss: float | None
    images: int
    classes: int
    skipped: int
    trainable_params: int
    elapsed_s: float
    img_per_s: float | None
    interrupted: bool
    cache: str | None
    buckets: list[dict] | None = None  # with aspect-ratio buckets: each one's size and images (Bucket.summary)
    stop_signal: str | None = None  # "SIGINT" or "SIGTERM" when a signal stopped the run (exit 130 / 143)
    best_step: int | None = None  # with --keep-best: the step of best/adapter.safetensors
    best_metric: float | None = None  # and its value of the --keep-best metric

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
