"""Tiny tasks the tests share: seconds to build, small enough for exact (unprojected) checks."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

import gradindex

# this file as a task spec prefix: f"{TINY}:mlp_task"
TINY = __file__


def _data(n_samples: int, n_features: int, n_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n_samples, n_features, generator=generator)
    targets = torch.randint(0, n_classes, (n_samples,), generator=generator)
    return inputs, targets


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )


def mlp_task(n_train: int = 120, n_test: int = 20) -> gradindex.Task:
    x_train, y_train = _data(n_train, 12, 4, seed=1)
    x_test, y_test = _data(n_test, 12, 4, seed=2)
    return gradindex.Task(
        model=mlp, train=TensorDataset(x_train, y_train), test=TensorDataset(x_test, y_test), name="tiny-mlp"
    )


def mlp_task_other_data() -> gradindex.Task:
    x_train, y_train = _data(120, 12, 4, seed=99)
    return gradindex.Task(
        model=mlp, train=TensorDataset(x_train, y_train), test=TensorDataset(x_train[:5], y_train[:5])
    )


def wide_mlp_task() -> gradindex.Task:
    task = mlp_task()
    return gradindex.Task(
        model=lambda: nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 4)), train=task.train, test=task.test
    )


def cnn_task(n_train: int = 40, n_test: int = 8) -> gradindex.Task:
    generator = torch.Generator().manual_seed(3)
    x_train = torch.randn(n_train, 1, 8, 8, generator=generator)
    y_train = torch.randint(0, 3, (n_train,), generator=generator)
    x_test = torch.randn(n_test, 1, 8, 8, generator=generator)
    y_test = torch.randint(0, 3, (n_test,), generator=generator)
    return gradindex.Task(
        model=cnn, train=TensorDataset(x_train, y_train), test=TensorDataset(x_test, y_test), name="tiny-cnn"
    )


def save_checkpoints(make_model, directory, weights=(0.5, 1.5, 1.0)) -> list[str]:
    """Checkpoints with different random weights, as ``PATH:WEIGHT`` specs."""
    specs = []
    for position, weight in enumerate(weights):
        torch.manual_seed(100 + position)
        path = directory / f"ckpt-{position}.pt"
        torch.save(make_model().state_dict(), path)
        specs.append(f"{path}:{weight}")
    return specs


def not_a_task():
    return 42
