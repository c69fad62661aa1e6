"""Featurizers: per-sample gradients (torch.func), projected and stacked over checkpoints."""

from gradindex.featurize._featurizer import (
    Featurizer,
    LoadedCheckpoint,
    TracInFeaturizer,
    iter_batches,
    labels_of,
    load_checkpoints,
    model_fingerprint,
    resolve_device,
)
from gradindex.featurize._grads import PerSampleGradients, select_parameters
from gradindex.featurize._kron import KronGradients

__all__ = [
    "Featurizer",
    "KronGradients",
    "LoadedCheckpoint",
    "PerSampleGradients",
    "TracInFeaturizer",
    "iter_batches",
    "labels_of",
    "load_checkpoints",
    "model_fingerprint",
    "resolve_device",
    "select_parameters",
]
