"""torch-fidelity's FID Inception: its weights file (found, or downloaded once) and feature extraction.

Features come from "inception-v3-compat": the TF-ported 2015-12-05 weights with TF1-exact bilinear
resizing to 299 px, so FIDs are comparable with published ones. We feed it uint8 batches ourselves
rather than through `calculate_metrics`, which lets us stream any image set, show our progress bar,
pick the device and run the network channels-last (about 1.8x faster on CPU, same features to 1e-6).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from difffit.engine.errors import DiffFitError
from difffit.engine.hub import downloads_disabled, network_reachable
from difffit.engine.io import atomic_path, check_readable, user_cache_dir
from difffit.engine.models.formats import read_torch
from difffit.engine.progress import track

FEATURE_EXTRACTOR = "inception-v3-compat"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
# pytorch-fid's copy of the same converted weights (same hash suffix); accepted if it is what's cached.
INCEPTION_ALIASES = (INCEPTION_FILE, "pt_inception-2015-12-05-6726825d.pth")
# `--inception-weights random`: the same network, randomly initialised (seed 0) and cached. It runs offline, so
# tests and demos can exercise FID end to end; its numbers show that the pipeline runs, not image quality.
RANDOM_WEIGHTS = "random"


def inception_cache_path() -> Path:
    """Where torch-fidelity's own download lands: <torch hub dir>/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The FID Inception weights file: `path` (or `random`, see RANDOM_WEIGHTS), else the torch hub cache,
    else a download if allowed.

    Checked before torch-fidelity is asked for anything, so offline machines fail fast with the
    file name and place instead of hanging in a download.
    """
    if path == RANDOM_WEIGHTS:
        cached = user_cache_dir() / "inception" / "random-seed0.pth"
        return cached if cached.is_file() else random_inception_weights(cached)
    if path is not None:
        path = Path(path).expanduser()
        check_readable(path, "Inception weights file")
        if not path.is_file():
            raise DiffFitError(f"The Inception weights file {path} does not exist.")
        return path
    target = inception_cache_path()
    for name in INCEPTION_ALIASES:
        if (target.parent / name).is_file():
            return target.parent / name
    how = f"download {INCEPTION_URL} and put it at {target}, or pass --inception-weights PATH"
    if downloads_disabled():
        raise DiffFitError(
            f"The FID Inception weights {INCEPTION_FILE} are not cached and downloads are off "
            f"(HF_HUB_OFFLINE or DIFFFIT_NO_DOWNLOAD); {how}."
        )
    if not network_reachable("github.com"):
        raise DiffFitError(f"The FID Inception weights {INCEPTION_FILE} are not cached and there is no network; {how}.")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:  # torch.hub writes to a temporary name and renames it into place
        torch.hub.download_url_to_file(INCEPTION_URL, str(target), progress=True)
    except Exception as exc:
        raise DiffFitError(f"Downloading the FID Inception weights failed ({exc}); {how}.") from None
    return target


def random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """A randomly initialised FID Inception state dict in torch-fidelity's format, written to `path`.

    Convolutions get He init so activations keep their scale through 90-odd layers (the default
    init shrinks them to ~1e-8, which would make every distance vanish). The global RNG is left as it was.
    """
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    cls = tf_inception.FeatureExtractorInceptionV3
    # The constructor always loads weights; let it build the layers and skip the loading.
    with (
        torch.random.fork_rng(devices=[]),
        mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None),
    ):
        torch.manual_seed(seed)
        net = cls(FEATURE_EXTRACTOR, ["2048"])
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(net.state_dict(), tmp)
    return path


def file_digest(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class InceptionFeatures:
    """torch-fidelity's FID Inception on `device`: uint8 (N, H, W, 3) -> {"2048": pool3, ...}."""

    def __init__(self, weights: Path, device: torch.device, features: tuple[str, ...] = ("2048",)):
        from torch_fidelity.utils import create_feature_extractor

        # torch-fidelity unpickles the file; read it safely first (difffit's one reader of .pt files, with its
        # one-sentence errors) so that only tensors ever get there.
        read_torch(weights)
        try:  # cuda=False: we move it ourselves (torch-fidelity's default would be CUDA)
            net = create_feature_extractor(
                FEATURE_EXTRACTOR,
                list(features),
                cuda=False,
                feature_extractor_weights_path=str(weights),
                verbose=False,
            )
        except RuntimeError as exc:
            raise DiffFitError(
                f"{weights} is not torch-fidelity's FID Inception ({str(exc).splitlines()[0]})."
            ) from None
        self.net = net.to(device, memory_format=torch.channels_last)
        self.device = device
        self.features = features

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        out = self.net(x.permute(0, 3, 1, 2))  # NHWC memory is already channels-last NCHW
        return {name: value.cpu() for name, value in zip(self.features, out, strict=True)}


class ImageSet(Protocol):
    """What `extract_features` reads (image_sets.py's sets, clip_score's ScoredAsRead): `count` images in uint8
    batches, each an N x H x W x 3 array or a list of H x W x 3 ones (None: unreadable, then listed in `skipped`)."""

    @property
    def count(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def skipped(self) -> list[tuple[Path, str]]: ...

    def batches(self, batch_size: int) -> Iterator[np.ndarray | list[np.ndarray | None]]: ...


def extractor_identity(weights: Path) -> str:
    """Part of every statistics cache key: the network and the exact weights file."""
    return f"{FEATURE_EXTRACTOR}/sha256:{file_digest(weights)}"


def extract_features(
    images: ImageSet, extractor: InceptionFeatures, *, batch_size: int, description: str, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Run the extractor over an image set; images of different sizes are batched separately."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in extractor.features}
    with track(images.count, description, enabled=progress) as advance:
        for batch in images.batches(batch_size):
            if isinstance(batch, list):
                valid = [image for image in batch if image is not None]
                groups = [np.stack(list(run)) for _, run in itertools.groupby(valid, key=lambda a: a.shape)]
            else:
                groups = [batch]
            for group in groups:
                for name, value in extractor(group).items():
                    out[name].append(value)
            advance(len(batch))
    if not out["2048"]:
        raise DiffFitError(f"None of the {images.count} images in {images.name} could be read.")
    return {name: torch.cat(values) for name, values in out.items()}


class LazyExtractor:
    """The network is built only when some image set actually needs extracting (not on cache hits)."""

    def __init__(self, weights: Path, device: torch.device, features: tuple[str, ...]):
        self.path, self.device, self.features = weights, device, features
        self.identity = extractor_identity(weights)
        self._net: InceptionFeatures | None = None

    def get(self) -> InceptionFeatures:
        if self._net is None:
            self._net = InceptionFeatures(self.path, self.device, self.features)
        return self._net
