"""What the built-in tasks share: label noise, splits, tensors, sample ids, small models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import TensorDataset

from gradindex.errors import ArgumentError, TaskSpecError

__all__ = [
    "LabelNoise",
    "flip_labels",
    "mlp",
    "split_ids",
    "stratified_split",
    "task_option",
    "tensor_dataset",
]


@dataclass(frozen=True, eq=False)
class LabelNoise:
    """Which training labels a built-in task corrupted, so detectors can be scored against the truth.

    flipped_rows: sorted training rows whose label was replaced, ``int64[n_flipped]``.
    clean_labels: the original training labels, ``int64[n_train]``.
    noisy_labels: the labels the task trains on, ``int64[n_train]``; differs from clean exactly at flipped_rows.
    """

    flipped_rows: np.ndarray
    clean_labels: np.ndarray
    noisy_labels: np.ndarray

    @property
    def n_flipped(self) -> int:
        return int(self.flipped_rows.size)

    @property
    def flipped_mask(self) -> np.ndarray:
        """``bool[n_train]``, True at flipped rows."""
        mask = np.zeros(self.clean_labels.shape[0], dtype=bool)
        mask[self.flipped_rows] = True
        return mask


def task_option(check: Callable[..., Any], name: str, value: Any, **options: Any) -> Any:
    """A built-in task's option through the one argument checker (``gradindex.utils``): a bad value is a
    ``TaskSpecError``, since the task spec is what is wrong."""
    try:
        return check(name, value, **options)
    except ArgumentError as error:
        raise TaskSpecError(str(error)) from None


def flip_labels(labels: np.ndarray, fraction: float, n_classes: int, seed: int) -> LabelNoise:
    """Replace ``round(fraction * n)`` labels, chosen at random, by a different class drawn uniformly.

    The stream is seeded separately from the train/test split, so adding noise never moves the split.
    """
    clean = np.asarray(labels, dtype=np.int64).copy()
    n_flip = int(round(fraction * clean.shape[0]))
    rng = np.random.default_rng([seed, 0x5EED_F11B])
    rows = np.sort(rng.choice(clean.shape[0], size=n_flip, replace=False)).astype(np.int64)
    # An offset in 1..n_classes-1 (mod n_classes) is uniform over the other classes and never the same one.
    offsets = rng.integers(1, n_classes, size=n_flip)
    noisy = clean.copy()
    noisy[rows] = (clean[rows] + offsets) % n_classes
    for array in (rows, clean, noisy):
        array.flags.writeable = False
    return LabelNoise(flipped_rows=rows, clean_labels=clean, noisy_labels=noisy)


def stratified_split(
    features: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, x_test, y_train, y_test)``, stratified by label, deterministic given seed."""
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return x_train, x_test, y_train, y_test


def tensor_dataset(features: np.ndarray, labels: np.ndarray) -> TensorDataset:
    """float32 inputs, int64 targets (copied, so cached arrays stay untouched)."""
    return TensorDataset(
        torch.tensor(np.asarray(features), dtype=torch.float32),
        torch.tensor(np.asarray(labels), dtype=torch.int64),
    )


def split_ids(prefix: str, split: str, n_samples: int) -> list[str]:
    """``["digits/train/0000", ...]``: stable, unique, sortable."""
    width = max(4, len(str(max(n_samples - 1, 0))))
    return [f"{prefix}/{split}/{row:0{width}d}" for row in range(n_samples)]


def mlp(n_inputs: int, hidden: int, n_classes: int) -> nn.Sequential:
    """``[B, n_inputs] -> [B, n_classes]`` with one ReLU hidden layer."""
    return nn.Sequential(nn.Linear(n_inputs, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
