"""Tasks the reliability suite builds: a ~20k-row store in about a second, and small tasks with bad data."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

import gradindex


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))


def _data(n_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_samples, 12, generator=generator), torch.randint(0, 4, (n_samples,), generator=generator)


def _task(x: torch.Tensor, y: torch.Tensor, name: str) -> gradindex.Task:
    x_test, y_test = _data(16, seed=7)
    return gradindex.Task(model=mlp, train=TensorDataset(x, y), test=TensorDataset(x_test, y_test), name=name)


def big_task() -> gradindex.Task:
    """20,000 rows: the store the kill, I/O-error and concurrency sweeps build."""
    return _task(*_data(20_000, seed=1), name="reliability-20k")


def small_task() -> gradindex.Task:
    """600 rows: enough shards to corrupt, fast enough to rebuild hundreds of times."""
    return _task(*_data(600, seed=1), name="reliability-600")


def nan_rows() -> list[int]:
    return [5, 37, 38, 410]


def nan_task() -> gradindex.Task:
    """small_task with NaN inputs in a few rows: their gradients are NaN."""
    x, y = _data(600, seed=1)
    x[nan_rows(), 3] = float("nan")
    return _task(x, y, name="reliability-nan")


def inf_task() -> gradindex.Task:
    """small_task with +inf and -inf inputs in two rows."""
    x, y = _data(600, seed=1)
    x[7, 0] = float("inf")
    x[300, 5] = float("-inf")
    return _task(x, y, name="reliability-inf")


def _sum_of_logits(model: nn.Module, batch) -> torch.Tensor:
    return model(batch[0]).sum(dim=1)


def huge_task() -> gradindex.Task:
    """small_task with one row scaled so its gradient passes float16's 65504 (ReLU and a linear loss, so it does not
    saturate)."""
    x, y = _data(600, seed=1)
    x[450] *= 1e6
    task = _task(x, y, name="reliability-huge")
    # the same parameters as mlp
    relu = lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))  # noqa: E731
    return gradindex.Task(model=relu, train=task.train, test=task.test, loss=_sum_of_logits, name="reliability-huge")


def edited_task() -> gradindex.Task:
    """small_task with one sample changed in a row the 32-item probe does not look at (row 1)."""
    x, y = _data(600, seed=1)
    x[1, 0] += 1.0
    return _task(x, y, name="reliability-600")


def wide_task() -> gradindex.Task:
    """small_task's data with a wider model."""
    x, y = _data(600, seed=1)
    task = _task(x, y, name="reliability-600")
    return gradindex.Task(
        model=lambda: nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 4)), train=task.train, test=task.test
    )


def save_checkpoints(directory, count: int = 2, make_model=mlp) -> list[str]:
    specs = []
    for position in range(count):
        torch.manual_seed(500 + position)
        path = directory / f"ckpt-{position}.pt"
        torch.save(make_model().state_dict(), path)
        specs.append(f"{path}:{0.5 + position}")
    return specs


def io_task() -> gradindex.Task:
    """250 rows (3 shards of 100, the last partial): every disk step of its build is failed in turn."""
    return _task(*_data(250, seed=1), name="reliability-250")


# ---- a growing training set (build --append): 1050 rows in shards of 100 (the last partial), grown to 1300 ---------
APPEND_OLD, APPEND_NEW = 1050, 1300


def _grown(n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_samples`` of one 1300-row set: every size shares its first rows."""
    x, y = _data(APPEND_NEW, seed=3)
    return x[:n_samples].clone(), y[:n_samples].clone()


def _append_task(x: torch.Tensor, y: torch.Tensor, sample_ids: list | None = None) -> gradindex.Task:
    task = _task(x, y, name="reliability-append")
    return gradindex.Task(model=mlp, train=task.train, test=task.test, sample_ids=sample_ids, name=task.name)


def append_old_task() -> gradindex.Task:
    """The store's rows: 1050 samples (11 shards of 100, the last one half full)."""
    return _append_task(*_grown(APPEND_OLD))


def append_new_task() -> gradindex.Task:
    """The grown set: the 1050 old samples, unchanged and in order, then 250 new ones."""
    return _append_task(*_grown(APPEND_NEW))


def append_changed_sample_task() -> gradindex.Task:
    """The grown set with old sample 550 changed (a row the 32-sample probe does not look at)."""
    x, y = _grown(APPEND_NEW)
    x[550, 0] += 1.0
    return _append_task(x, y)


def append_reordered_task() -> gradindex.Task:
    """The grown set with old samples 700 and 701 swapped."""
    x, y = _grown(APPEND_NEW)
    x[[700, 701]], y[[700, 701]] = x[[701, 700]].clone(), y[[701, 700]].clone()
    return _append_task(x, y)


def append_changed_ids_task() -> gradindex.Task:
    """The grown set whose old row 300 has another sample id."""
    ids = list(range(APPEND_NEW))
    ids[300] = 10_000
    return _append_task(*_grown(APPEND_NEW), sample_ids=ids)


def append_string_ids_task() -> gradindex.Task:
    """The grown set with every sample id a string ("0", "1", ...) where the store's are integers."""
    return _append_task(*_grown(APPEND_NEW), sample_ids=[str(row) for row in range(APPEND_NEW)])


def append_string_new_ids_task() -> gradindex.Task:
    """The grown set whose old ids are unchanged integers and whose new ids are strings."""
    ids = list(range(APPEND_OLD)) + [f"new-{row}" for row in range(APPEND_OLD, APPEND_NEW)]
    return _append_task(*_grown(APPEND_NEW), sample_ids=ids)
