"""Tasks whose training set grows (for build --append): the first rows stay the same, new ones come after."""

from __future__ import annotations

import torch
from tiny_tasks import mlp
from torch.utils.data import TensorDataset

import gradindex


def _data(n_samples: int, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(120, 12, generator=generator)
    targets = torch.randint(0, 4, (120,), generator=generator)
    return inputs[:n_samples], targets[:n_samples]


def _task(n_samples: int, seed: int = 11) -> gradindex.Task:
    x_test, y_test = _data(10, seed=5)
    return gradindex.Task(
        model=mlp, train=TensorDataset(*_data(n_samples, seed)), test=TensorDataset(x_test, y_test), name="grow"
    )


def first_70() -> gradindex.Task:
    return _task(70)


def first_120() -> gradindex.Task:
    return _task(120)


def other_120() -> gradindex.Task:
    """120 samples whose first 70 are not those of first_70."""
    return _task(120, seed=12)
