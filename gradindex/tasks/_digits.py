"""scikit-learn's 8x8 handwritten digits (1,797 images, bundled, no download), optionally with flipped labels."""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
from torch import nn

from gradindex.errors import TaskSpecError
from gradindex.task import Task
from gradindex.tasks._common import (
    LabelNoise,
    flip_labels,
    mlp,
    split_ids,
    stratified_split,
    task_option,
    tensor_dataset,
)
from gradindex.utils import check_fraction, check_non_negative_int, check_positive_int

__all__ = ["digits", "digits_cnn", "digits_with_info"]

N_CLASSES = 10


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(float32[1797, 64] in [0, 1], int64[1797])``, read-only so the cache cannot be corrupted."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (bunch.data / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    pixels.flags.writeable = False
    labels.flags.writeable = False
    return pixels, labels


def digits_cnn_model(channels: int = 8) -> nn.Sequential:
    """``[B, 1, 8, 8] -> [B, 10]``: two 3x3 convolutions, one 2x2 max-pool, one linear layer."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * 4 * 4, N_CLASSES),
    )


def digits_with_info(
    flip_fraction: float = 0.0,
    seed: int = 0,
    hidden: int = 32,
    test_fraction: float = 0.25,
    architecture: Literal["mlp", "cnn"] = "mlp",
    channels: int = 8,
) -> tuple[Task, LabelNoise]:
    """The digits task and which of its training labels were flipped.

    Pixels are scaled to [0, 1]; the train/test split is stratified and set by ``seed``. With
    ``flip_fraction > 0``, ``round(flip_fraction * n_train)`` training labels (never test labels) are
    replaced by a different class drawn uniformly from the other nine.

    architecture: ``"mlp"`` (inputs ``float32[B, 64]``, 64-hidden-10 with ReLU) or
                  ``"cnn"`` (inputs ``float32[B, 1, 8, 8]``, see ``digits_cnn_model``).
    """
    flip_fraction = task_option(check_fraction, "flip_fraction", flip_fraction, low_open=False, high_open=False)
    test_fraction = task_option(check_fraction, "test_fraction", test_fraction, low_open=True, high_open=True)
    seed = task_option(check_non_negative_int, "seed", seed)
    if architecture == "mlp":
        hidden = task_option(check_positive_int, "hidden", hidden)
        make_model = functools.partial(mlp, 64, hidden, N_CLASSES)
        input_shape: tuple[int, ...] = (64,)
        name = "digits"
    elif architecture == "cnn":
        channels = task_option(check_positive_int, "channels", channels)
        make_model = functools.partial(digits_cnn_model, channels)
        input_shape = (1, 8, 8)
        name = "digits-cnn"
    else:
        raise TaskSpecError(f"architecture must be 'mlp' or 'cnn', got {architecture!r}")

    pixels, labels = _load_digits()
    x_train, x_test, y_train, y_test = stratified_split(pixels, labels, test_fraction, seed)
    noise = flip_labels(y_train, flip_fraction, N_CLASSES, seed)
    task = Task(
        model=make_model,
        train=tensor_dataset(x_train.reshape(-1, *input_shape), noise.noisy_labels),
        test=tensor_dataset(x_test.reshape(-1, *input_shape), y_test),
        sample_ids=split_ids("digits", "train", len(y_train)),
        name=name,
    )
    return task, noise


def digits(flip_fraction: float = 0.0, seed: int = 0, hidden: int = 32, test_fraction: float = 0.25) -> Task:
    """Handwritten 8x8 digits with a 64-hidden-10 MLP; see ``digits_with_info`` for the options."""
    task, _ = digits_with_info(flip_fraction=flip_fraction, seed=seed, hidden=hidden, test_fraction=test_fraction)
    return task


def digits_cnn(flip_fraction: float = 0.0, seed: int = 0, channels: int = 8, test_fraction: float = 0.25) -> Task:
    """The digits data as ``1x8x8`` images with a small CNN; see ``digits_with_info`` for the options."""
    task, _ = digits_with_info(
        flip_fraction=flip_fraction, seed=seed, test_fraction=test_fraction, architecture="cnn", channels=channels
    )
    return task
