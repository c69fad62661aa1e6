"""MNIST-1D (Greydanus 2020): 10 classes of 40-sample 1-D signals, generated procedurally, never downloaded.

Needs the optional ``mnist1d`` package (``pip install mnist1d``). Only its generator
(``mnist1d.data.make_dataset``) is used; its ``get_dataset`` would try to download a pickle.
"""

from __future__ import annotations

import functools
import random
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
    task_option,
    tensor_dataset,
)
from gradindex.utils import check_fraction, check_non_negative_int, check_positive_int

__all__ = ["mnist1d", "mnist1d_cnn", "mnist1d_with_info"]

N_CLASSES = 10
SEQUENCE_LENGTH = 40


@functools.lru_cache(maxsize=4)
def _generate(n_samples: int, data_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train float32[0.8n, 40], y_train int64, x_test, y_test)``, the package's own 80/20 split, read-only."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise TaskSpecError(
            f"the mnist1d built-in task needs the mnist1d package ({error}); install it with `pip install mnist1d`"
        ) from error
    args = get_dataset_args()
    args.num_samples = n_samples
    args.seed = data_seed
    # make_dataset reseeds the global numpy and random generators; hand the caller's state back.
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    arrays = (
        np.asarray(data["x"], dtype=np.float32),
        np.asarray(data["y"], dtype=np.int64),
        np.asarray(data["x_test"], dtype=np.float32),
        np.asarray(data["y_test"], dtype=np.int64),
    )
    for array in arrays:
        array.flags.writeable = False
    return arrays


def mnist1d_cnn_model(channels: int = 16) -> nn.Sequential:
    """``[B, 1, 40] -> [B, 10]``: three 1-D convolutions (two with stride 2) and one linear layer."""
    return nn.Sequential(
        nn.Conv1d(1, channels, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * SEQUENCE_LENGTH // 4, N_CLASSES),
    )


def mnist1d_with_info(
    flip_fraction: float = 0.0,
    seed: int = 0,
    hidden: int = 100,
    n_samples: int = 5000,
    data_seed: int = 42,
    architecture: Literal["mlp", "cnn"] = "mlp",
    channels: int = 16,
) -> tuple[Task, LabelNoise]:
    """The MNIST-1D task and which of its training labels were flipped.

    The signals come from the package's generator with ``data_seed`` (42 is the published data
    set's seed) and its fixed 80/20 train/test split, so results compare with the MNIST-1D
    literature; ``seed`` sets only the label noise. With ``flip_fraction > 0``,
    ``round(flip_fraction * n_train)`` training labels become a different class, uniform over the other nine.

    architecture: ``"mlp"`` (inputs ``float32[B, 40]``, 40-hidden-10 with ReLU) or
                  ``"cnn"`` (inputs ``float32[B, 1, 40]``, see ``mnist1d_cnn_model``).
    """
    flip_fraction = task_option(check_fraction, "flip_fraction", flip_fraction, low_open=False, high_open=False)
    seed = task_option(check_non_negative_int, "seed", seed)
    n_samples = task_option(check_positive_int, "n_samples", n_samples)
    if n_samples < 10 * N_CLASSES:
        raise TaskSpecError(f"n_samples must be at least {10 * N_CLASSES} (ten per class), got {n_samples}")
    data_seed = task_option(check_non_negative_int, "data_seed", data_seed)
    if architecture == "mlp":
        hidden = task_option(check_positive_int, "hidden", hidden)
        make_model = functools.partial(mlp, SEQUENCE_LENGTH, hidden, N_CLASSES)
        input_shape: tuple[int, ...] = (SEQUENCE_LENGTH,)
        name = "mnist1d"
    elif architecture == "cnn":
        channels = task_option(check_positive_int, "channels", channels)
        make_model = functools.partial(mnist1d_cnn_model, channels)
        input_shape = (1, SEQUENCE_LENGTH)
        name = "mnist1d-cnn"
    else:
        raise TaskSpecError(f"architecture must be 'mlp' or 'cnn', got {architecture!r}")

    x_train, y_train, x_test, y_test = _generate(n_samples, data_seed)
    noise = flip_labels(y_train, flip_fraction, N_CLASSES, seed)
    task = Task(
        model=make_model,
        train=tensor_dataset(x_train.reshape(-1, *input_shape), noise.noisy_labels),
        test=tensor_dataset(x_test.reshape(-1, *input_shape), y_test),
        sample_ids=split_ids("mnist1d", "train", len(y_train)),
        name=name,
    )
    return task, noise


def mnist1d(flip_fraction: float = 0.0, seed: int = 0, hidden: int = 100, n_samples: int = 5000) -> Task:
    """MNIST-1D with a 40-hidden-10 MLP; see ``mnist1d_with_info`` for the options."""
    task, _ = mnist1d_with_info(flip_fraction=flip_fraction, seed=seed, hidden=hidden, n_samples=n_samples)
    return task


def mnist1d_cnn(flip_fraction: float = 0.0, seed: int = 0, channels: int = 16, n_samples: int = 5000) -> Task:
    """MNIST-1D as ``1x40`` signals with a small 1-D CNN; see ``mnist1d_with_info`` for the options."""
    task, _ = mnist1d_with_info(
        flip_fraction=flip_fraction, seed=seed, n_samples=n_samples, architecture="cnn", channels=channels
    )
    return task
