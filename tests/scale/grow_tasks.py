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


def _changed(change) -> gradindex.Task:
    """first_120 with its old rows changed by ``change(inputs, targets, ids)``."""
    inputs, targets = _data(120)
    ids = list(range(120))
    change(inputs, targets, ids)
    x_test, y_test = _data(10, seed=5)
    return gradindex.Task(
        model=mlp, train=TensorDataset(inputs, targets), test=TensorDataset(x_test, y_test), sample_ids=ids, name="grow"
    )


def changed_41() -> gradindex.Task:
    """Old sample 41 changed (a row the 32-sample probe of 70 rows does not look at)."""
    return _changed(lambda inputs, targets, ids: inputs[41].add_(1.0))


def swapped_10_11() -> gradindex.Task:
    def swap(inputs, targets, ids):
        inputs[[10, 11]] = inputs[[11, 10]].clone()
        targets[[10, 11]] = targets[[11, 10]].clone()

    return _changed(swap)


def renamed_id_5() -> gradindex.Task:
    return _changed(lambda inputs, targets, ids: ids.__setitem__(5, 99))


def string_ids() -> gradindex.Task:
    return _changed(lambda inputs, targets, ids: ids.__setitem__(slice(None), [str(row) for row in ids]))
