"""scikit-learn's Wisconsin breast cancer set (569 x 30, bundled) with L2-regularised logistic regression.

A convex task with a positive-definite Hessian, so exact influence functions are well defined on it.
"""

from __future__ import annotations

import functools

import numpy as np
from torch import Tensor, nn

from gradindex.task import Task
from gradindex.tasks._common import split_ids, stratified_split, task_option, tensor_dataset
from gradindex.utils import check_fraction, check_non_negative, check_non_negative_int

__all__ = ["breast_cancer", "l2_penalty"]

N_FEATURES = 30
N_CLASSES = 2


@functools.lru_cache(maxsize=1)
def _load_breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """``(float64[569, 30], int64[569])``, read-only so the cache cannot be corrupted."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    features = bunch.data.astype(np.float64)
    labels = bunch.target.astype(np.int64)
    features.flags.writeable = False
    labels.flags.writeable = False
    return features, labels


def logistic_regression() -> nn.Linear:
    """``[B, 30] -> [B, 2]`` logits."""
    return nn.Linear(N_FEATURES, N_CLASSES)


def l2_penalty(model: nn.Module, strength: float) -> Tensor:
    """``strength / 2 * ||θ||²`` over every parameter (bias included, so the Hessian is positive definite)."""
    return 0.5 * strength * sum(parameter.pow(2).sum() for parameter in model.parameters())


def breast_cancer(seed: int = 0, test_fraction: float = 0.25, l2: float = 0.01) -> Task:
    """Benign vs malignant from 30 standardized features; logistic regression, cross-entropy, L2 term ``l2``.

    Features are standardized with the training split's mean and standard deviation; the split is
    stratified and set by ``seed``.
    """
    seed = task_option(check_non_negative_int, "seed", seed)
    test_fraction = task_option(check_fraction, "test_fraction", test_fraction, low_open=True, high_open=True)
    l2 = task_option(check_non_negative, "l2", l2)

    features, labels = _load_breast_cancer()
    x_train, x_test, y_train, y_test = stratified_split(features, labels, test_fraction, seed)
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0.0] = 1.0
    return Task(
        model=logistic_regression,
        train=tensor_dataset((x_train - mean) / std, y_train),
        test=tensor_dataset((x_test - mean) / std, y_test),
        sample_ids=split_ids("breast-cancer", "train", len(y_train)),
        regularization=functools.partial(l2_penalty, strength=l2) if l2 > 0 else None,
        name="breast-cancer",
    )
