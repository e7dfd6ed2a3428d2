"""Helpers for difffit's tests, benchmarks and examples; the tool itself never uses them."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from difffit_cli.engine.evaluation.inception import FEATURE_EXTRACTOR
from difffit_cli.engine.io import atomic_path


def random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """A randomly initialised FID Inception state dict in torch-fidelity's format (tests, benchmarks).

    Convolutions get He init so activations keep their scale through 90-odd layers (the default
    init shrinks them to ~1e-8, which would make every distance vanish).
    """
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    cls = tf_inception.FeatureExtractorInceptionV3
    torch.manual_seed(seed)
    # The constructor always loads weights; let it build the layers and skip the loading.
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None):
        net = cls(FEATURE_EXTRACTOR, ["2048"])
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(net.state_dict(), tmp)
    return path
