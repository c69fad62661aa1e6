"""Featurization: the ``Featurizer`` interface and the per-sample gradient engines the methods build on.

``PerSampleGradients`` is ``vmap(grad(loss))`` over any model; ``KronGradients`` computes the factored ``kron``
projection of Linear / Conv1D / Conv / Embedding layers (tied ones too) from one batched forward and backward, never
forming a per-sample gradient, and the other parameters from their own modules' calls (``find_kron_layers`` routes
each parameter and says why). Which φ a method makes of them lives in ``gradindex.methods``.
"""

from gradindex.featurize._base import Featurizer, LoadedCheckpoint, load_checkpoints, model_fingerprint, resolve_device
from gradindex.featurize._factored import (
    KronGradients,
    KronRouting,
    ParamRoute,
    find_kron_layers,
    is_hf_conv1d,
    layer_second_moment,
    layer_sides,
    mixing_modules,
    squared_norms,
)
from gradindex.featurize._per_sample import LossModule, PerSampleGradients, select_parameters

__all__ = [
    "Featurizer",
    "KronGradients",
    "KronRouting",
    "LoadedCheckpoint",
    "LossModule",
    "ParamRoute",
    "PerSampleGradients",
    "find_kron_layers",
    "is_hf_conv1d",
    "layer_second_moment",
    "layer_sides",
    "load_checkpoints",
    "mixing_modules",
    "model_fingerprint",
    "resolve_device",
    "select_parameters",
    "squared_norms",
]
