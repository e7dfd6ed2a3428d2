"""FID, KID, Inception Score and precision/recall between generated and reference images, and the CLIP score.

The features are inception.py's (torch-fidelity's FID Inception, fed by us); the metric math is torch-fidelity's,
FID's matrix square root through a faster, equivalent symmetric eigenproblem (statistics.py). A reference's
statistics are cached by content.

GENERATED and REFERENCE: an image set of image_sets.py (a folder, or the `arr_0` images of an `.npz`), or an `.npz`
with precomputed `mu`/`sigma` (an ADM reference batch, or a file written with `save_stats`); GENERATED may also be
a model source (adapter or base), sampled in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from difffit.engine.data.batches import MAX_FORWARD_BATCH
from difffit.engine.devices import resolve_device
from difffit.engine.errors import DiffFitError, require_at_least, require_at_most
from difffit.engine.evaluation.clip_score import DEFAULT_CLIP_MODEL, ClipScorer, ScoredAsRead, clip_folder, score_pairs
from difffit.engine.evaluation.image_sets import (
    CroppedImages,
    FolderImages,
    ModelInput,
    ModelSamples,
    NpzImages,
    npz_members,
)
from difffit.engine.evaluation.inception import ImageSet, LazyExtractor, extract_features, resolve_inception_weights
from difffit.engine.evaluation.options import MAX_IMAGES, EvalConfig, check_image_count
from difffit.engine.evaluation.statistics import (
    STATS_FORMAT,
    Statistics,
    frechet_distance,
    load_statistics,
    save_statistics,
)
from difffit.engine.io import check_output, check_readable, user_cache_dir

METRICS = ("fid", "kid", "isc", "prc", "clip")
ISC_SPLITS = 10
PRC_NEIGHBORHOOD = 3
MAX_KID_SUBSETS = 100_000  # torch-fidelity draws 100; each subset is a kernel over two subsets' features


@dataclass
class Evaluation:
    metrics: dict[str, float]
    num_generated: int
    num_reference: int
    reference_source: str  # "extracted", "cache", "file", or "none" (the clip metric alone)
    skipped: list[tuple[Path, str]]

    def to_json(self) -> dict:
        # num_reference is null for a statistics file that doesn't record its image count
        counts = {"num_generated": self.num_generated, "num_reference": self.num_reference or None}
        return {**self.metrics, **counts}


def parse_metrics(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    names = [m.strip().lower() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        name = unknown[0] if unknown else "(none)"
        raise DiffFitError(f"Unknown metric {name!r}; choose from {', '.join(METRICS)}.")
    return tuple(m for m in METRICS if m in names)


def open_input(
    spec: str,
    *,
    role: str,
    limit: int | None,
    need_features: bool,
    model: ModelInput | None = None,
    device: torch.device | None = None,
    progress: bool = True,
) -> FolderImages | NpzImages | ModelSamples | Statistics:
    """GENERATED or REFERENCE -> an image set to extract from, or statistics read from a file."""
    check_readable(spec, role)
    path = Path(spec).expanduser()
    if path.is_dir():
        return FolderImages(path, limit)
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise DiffFitError(f"The {role} file {path} does not exist.")
        members = npz_members(path)
        has_stats = {"mu", "sigma"} <= members
        # An ADM reference batch has both: FID uses its precomputed mu/sigma, as ADM's evaluator does.
        if has_stats and (not need_features or "features" in members):
            if limit is not None:
                raise DiffFitError(f"{path} holds statistics, so -n cannot select from it.")
            stats = load_statistics(path)
            if not stats.count and "arr_0" in members:
                stats.count = NpzImages(path).count
            return stats
        if "arr_0" in members:
            return NpzImages(path, limit)
        if has_stats:
            raise DiffFitError(f"{path} holds only mu/sigma; KID, IS and precision/recall need arr_0 images.")
        raise DiffFitError(f"{path} has neither images (arr_0) nor statistics (mu, sigma).")
    if role == "reference" or model is None:
        raise DiffFitError(f"The {role} {spec} is neither a folder of images nor an .npz file.")
    return ModelSamples.from_source(spec, limit, model, device or resolve_device("auto"), progress)


def reference_statistics(
    images: FolderImages | NpzImages | CroppedImages,
    extractor: LazyExtractor,
    *,
    keep_features: bool,
    batch_size: int,
    progress: bool,
) -> tuple[Statistics, str]:
    """Statistics of a reference image set, from the on-disk cache when its content was seen before."""
    key = hashlib.sha256(f"{STATS_FORMAT}\0{extractor.identity}\0{images.digest()}\0{images.count}".encode())
    cached = user_cache_dir() / "fid-stats" / f"{key.hexdigest()[:32]}.npz"
    if cached.is_file():
        stats = load_statistics(cached)
        if stats.features is not None or not keep_features:
            return stats, "cache"
    features = extract_features(
        images, extractor.get(), batch_size=batch_size, description="Inception features (reference)", progress=progress
    )
    # The cache keeps pool3 features only when a metric needed them (50k x 2048 floats is 400 MB).
    stats = Statistics.from_features(features, extractor.identity, keep_features, images.skipped)
    if not images.skipped:  # a decode failure might be transient; don't make it permanent
        save_statistics(
            cached,
            Statistics(stats.mu, stats.sigma, stats.count, stats.features, extractor=stats.extractor),
            option="DIFFFIT_CACHE",
        )
    return stats, "extracted"


def check_counts(metrics: tuple[str, ...], num_gen: int, num_ref: int, kid_subset_size: int) -> None:
    """Enough images for each metric? Checked before extraction (input sizes) and after (readable ones)."""
    sides = f"generated: {num_gen}, reference: {num_ref}"
    if "fid" in metrics and min(num_gen, num_ref) < 2:
        raise DiffFitError(f"FID needs at least 2 images on each side ({sides}).")
    if "kid" in metrics and min(num_gen, num_ref) < kid_subset_size:
        raise DiffFitError(
            f"KID draws subsets of {kid_subset_size} images but a side has fewer ({sides}); "
            f"pass --kid-subset-size {max(2, min(num_gen, num_ref))} or use more images."
        )
    if "isc" in metrics and num_gen < ISC_SPLITS:
        raise DiffFitError(f"The Inception Score needs {ISC_SPLITS}+ generated images (got {num_gen}).")
    if "prc" in metrics and min(num_gen, num_ref) <= PRC_NEIGHBORHOOD:
        raise DiffFitError(f"Precision/recall need over {PRC_NEIGHBORHOOD} images on each side ({sides}).")


def compute_metrics(
    metrics: tuple[str, ...],
    gen: Statistics,
    ref: Statistics,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    device: torch.device | None = None,
) -> dict[str, float]:
    """torch-fidelity's metric functions on our statistics and features (generated = its input1)."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    # A foreign statistics file may not say how many images made it (count 0): FID only, then.
    check_counts(metrics, gen.count, ref.count or gen.count, kid_subset_size)
    if gen.mu.shape != ref.mu.shape:
        raise DiffFitError(
            f"The two sides have statistics of different sizes ({len(gen.mu)} vs {len(ref.mu)} features); "
            f"both must come from the FID Inception's 2048 pool3 features."
        )
    out: dict[str, float] = {}
    if "fid" in metrics:
        out["fid"] = frechet_distance(gen, ref, device or "cpu")
    if "kid" in metrics:
        kid = kid_features_to_metric(
            gen.features, ref.features, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, verbose=False
        )
        out["kid_mean"] = kid["kernel_inception_distance_mean"]
        out["kid_std"] = kid["kernel_inception_distance_std"]
    if "isc" in metrics:
        isc = isc_features_to_metric(gen.logits, ISC_SPLITS)
        out["isc_mean"], out["isc_std"] = isc["inception_score_mean"], isc["inception_score_std"]
    if "prc" in metrics:
        # Pairwise distances are the cost here (N x N x 2048): run them where the features were made.
        f1, f2 = (f.to(device or "cpu") for f in (gen.features, ref.features))
        prc = prc_features_to_metric(f1, f2, prc_neighborhood=PRC_NEIGHBORHOOD, save_cpu_ram=True, verbose=False)
        out["precision"], out["recall"] = prc["precision"], prc["recall"]
    return out


def evaluate(
    generated: str,
    reference: str | None = None,
    config: EvalConfig | None = None,
    *,
    progress: bool = True,
    **options,
) -> Evaluation:
    """Compare GENERATED with REFERENCE (see the module docstring for what each may be), as `config` says;
    `options` are EvalConfig fields that replace its (or the defaults'): `evaluate(gen, ref, metrics="fid,kid")`.

    Everything cheap is validated before anything slow starts: the reference, the weights, the
    generated input (a model is loaded, not yet sampled). When GENERATED is an adapter or base,
    `sampling` (default: a class-conditional model's cfg 1.5 and DDPM, the paper's FID setting; a
    text-to-image model's pipeline defaults), `classes` or `prompts` (a text-to-image model's), `base`, `vae`
    and `force_base` say how its samples are made. `save_stats` follows the output rules (never an input or
    inside one; an existing file only with `overwrite`) and is written, atomically, only when the metrics are computed.
    The `clip` metric scores GENERATED against the prompts its sample folder records, with `clip_model`
    (default: DEFAULT_CLIP_MODEL); it needs no REFERENCE.
    """
    config = dataclasses.replace(config or EvalConfig(), **options)
    save_stats, batch_size = config.save_stats, config.batch_size
    if save_stats is not None:
        # clip: no REFERENCE
        inputs = [spec for spec in (generated, reference, config.base, config.vae, config.inception_weights) if spec]
        save_stats = check_output(save_stats, overwrite=config.overwrite, inputs=inputs, option="--save-stats")
    metrics = parse_metrics(config.metrics)
    inception = tuple(m for m in metrics if m != "clip")
    _check_config(config, metrics, has_reference=reference is not None)
    torch_device = resolve_device(config.device)
    needs_features = "kid" in metrics or "prc" in metrics
    ref_input = open_input(reference, role="reference", limit=None, need_features=needs_features) if inception else None
    sampling = config.sampling or ModelInput().sampling
    model = ModelInput(sampling, config.classes, config.base, config.vae, config.force_base, config.prompts)
    gen_input = open_input(
        generated,
        role="generated",
        limit=config.num_samples,
        model=model,
        device=torch_device,
        need_features=needs_features or "isc" in metrics,
        progress=progress,
    )
    clip_model = _clip_model(gen_input, generated, config.clip_model) if "clip" in metrics else None
    values, ref, ref_source, skipped = {}, None, "none", []
    scored = None
    if "clip" in metrics and inception:  # scored as the Inception network reads them: each image made once
        gen_input = scored = ScoredAsRead(gen_input, ClipScorer(str(clip_model), torch_device))
    if inception:
        values, ref, ref_source, skipped = _inception_metrics(
            inception, gen_input, ref_input, config, device=torch_device, save_stats=save_stats, progress=progress
        )
    if scored is not None:
        values["clip_score"] = scored.scorer.score()
    elif "clip" in metrics:
        values["clip_score"] = _clip_score(gen_input, clip_model, torch_device, batch_size, progress)
        skipped = list(gen_input.skipped)
    if save_stats is not None:  # only once every metric is computed: a failed run writes nothing
        save_statistics(save_stats, ref)
    return Evaluation(values, gen_input.count - len(gen_input.skipped), ref.count if ref else 0, ref_source, skipped)


def _clip_model(gen_input: ImageSet, generated: str, clip_model: str | None) -> Path:
    """The clip metric's model folder, once GENERATED is known to record its prompts; a missing model fails
    here, not after FID."""
    if getattr(gen_input, "prompts", None) is None:
        raise DiffFitError(
            f"The clip metric scores each image against its prompt, and {generated} records no prompts.",
            hint="Score a folder written by `difffit sample --prompt ...` (its "
            "sample.json lists them), or a text-to-image adapter with --prompts FILE.",
        )
    return clip_folder(clip_model or DEFAULT_CLIP_MODEL)


def _clip_score(gen_input: ImageSet, clip_model: Path, device: torch.device, batch_size: int, progress: bool) -> float:
    """The clip metric alone: each readable image of GENERATED scored against its prompt."""
    batches = zip(gen_input.batches(batch_size), _chunks(gen_input.prompts, batch_size), strict=True)
    pairs = (
        (image, prompt)
        for images, prompts in batches
        for image, prompt in zip(images, prompts, strict=True)
        if image is not None
    )
    return score_pairs(
        pairs, gen_input.count, model=str(clip_model), device=device, batch_size=batch_size, progress=progress
    )


def _check_config(config: EvalConfig, metrics: tuple[str, ...], *, has_reference: bool) -> None:
    """The numbers and the metric combination `config` asks for make sense (nothing read or loaded yet)."""
    require_at_least("--batch-size", config.batch_size, 1)
    require_at_most("--batch-size", config.batch_size, MAX_FORWARD_BATCH, "the most images one forward pass takes")
    if config.num_samples is not None:
        check_image_count("-n", config.num_samples)
    if "kid" in metrics and (config.kid_subsets < 1 or config.kid_subset_size < 2):
        raise DiffFitError("KID needs --kid-subsets >= 1 and --kid-subset-size >= 2.")
    require_at_most("--kid-subsets", config.kid_subsets, MAX_KID_SUBSETS, "more subsets do not sharpen the estimate")
    require_at_most("--kid-subset-size", config.kid_subset_size, MAX_IMAGES, "more images than one run scores")
    if config.clip_model is not None and "clip" not in metrics:
        raise DiffFitError("--clip-model is the model of the clip metric; add clip to --metrics.")
    inception = tuple(m for m in metrics if m != "clip")
    if inception and not has_reference:
        raise DiffFitError(
            f"--metrics {','.join(inception)} compares the generated images with a REFERENCE; none was given.",
            hint="Give an image folder or statistics .npz, or ask for --metrics clip alone.",
        )
    if config.save_stats is not None and not inception:
        raise DiffFitError("--save-stats saves the REFERENCE's Inception statistics; --metrics clip computes none.")
    if has_reference and not inception:
        raise DiffFitError(
            "A REFERENCE was given, but --metrics clip compares images with their prompts only.",
            hint="Leave the REFERENCE out, or add fid to --metrics.",
        )


def _inception_metrics(
    metrics: tuple[str, ...],
    gen_input: ImageSet | Statistics,
    ref_input: FolderImages | NpzImages | Statistics,
    config: EvalConfig,
    *,
    device: torch.device,
    save_stats: Path | None,
    progress: bool,
) -> tuple[dict[str, float], Statistics, str, list]:
    """(values, reference statistics, reference source, skipped images) of FID, KID, IS and precision/recall."""
    needs_features = "kid" in metrics or "prc" in metrics
    layers = ("2048", "logits_unbiased") if "isc" in metrics else ("2048",)
    check_counts(metrics, gen_input.count, ref_input.count or gen_input.count, config.kid_subset_size)
    if not isinstance(ref_input, Statistics) or not isinstance(gen_input, Statistics):
        # Resolved now: a missing file fails here, not after an hour of sampling.
        extractor = LazyExtractor(resolve_inception_weights(config.inception_weights), device, layers)

    if isinstance(ref_input, Statistics):
        ref, ref_source = ref_input, "file"
    else:
        keep = needs_features or save_stats is not None  # a saved file can then serve KID and PRC too
        ref, ref_source = reference_statistics(
            ref_input, extractor, keep_features=keep, batch_size=config.batch_size, progress=progress
        )
    if isinstance(gen_input, Statistics):
        gen = gen_input
    else:
        features = extract_features(
            gen_input,
            extractor.get(),
            batch_size=config.batch_size,
            description="Inception features (generated)",
            progress=progress,
        )
        gen = Statistics.from_features(features, extractor.identity, needs_features, gen_input.skipped)
    values = compute_metrics(
        metrics, gen, ref, kid_subsets=config.kid_subsets, kid_subset_size=config.kid_subset_size, device=device
    )
    return values, ref, ref_source, gen.skipped + ref.skipped


def _chunks(items: list, size: int):
    return (items[i : i + size] for i in range(0, len(items), size))
