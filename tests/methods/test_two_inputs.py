"""Every method on a model with two inputs, batches ``((x1, x2), y)``: the same vectors, self-influence and query
scores as the same network on the concatenated input ``(x, y)`` (the trusted one-input path).

A batch helper that counted a nested batch by its outer tuple (2) broke if, trak and arnoldi on such models while
tracin worked; this keeps every method on the one batch rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import gradindex
from gradindex.task import default_margin

N_TRAIN, N_TEST = 24, 5


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


class OneInput(_Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TwoInputs(_Net):
    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x1, x2], dim=-1))


class PairDataset(Dataset):
    """Items ``((x1, x2), y)``."""

    def __init__(self, x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor) -> None:
        self.x1, self.x2, self.y = x1, x2, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return (self.x1[index], self.x2[index]), self.y[index]


def _pair_loss(model: nn.Module, batch) -> torch.Tensor:
    (x1, x2), y = batch
    return nn.functional.cross_entropy(model(x1, x2), y, reduction="none")


def _pair_margin(model: nn.Module, batch) -> torch.Tensor:
    return default_margin(lambda inputs: model(*inputs), batch)


def _data(n: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    return x, torch.randint(0, 3, (n,), generator=generator)


def _tasks() -> tuple[gradindex.Task, gradindex.Task]:
    (x, y), (xq, yq) = _data(N_TRAIN, 0), _data(N_TEST, 1)
    one = gradindex.Task(model=OneInput, train=TensorDataset(x, y), test=TensorDataset(xq, yq), name="one")
    two = gradindex.Task(
        model=TwoInputs,
        train=PairDataset(x[:, :2], x[:, 2:], y),
        test=PairDataset(xq[:, :2], xq[:, 2:], yq),
        loss=_pair_loss,
        margin=_pair_margin,
        name="two",
    )
    return one, two


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("two-input-ckpts")
    paths = []
    for seed in range(4):
        torch.manual_seed(seed)
        path = folder / f"ckpt-{seed}.pt"
        torch.save(OneInput().state_dict(), path)  # TwoInputs has the same parameters under the same names
        paths.append(f"{path}:0.5")
    return paths


# method -> (which checkpoints, build options)
CASES = {
    "tracin-kron": (slice(0, 2), {"method": "tracin", "proj_dim": 24}),
    "tracin-exact": (slice(0, 2), {"method": "tracin", "projection": "none"}),
    "gex": (slice(0, 4), {"method": "gex"}),
    "if": (slice(0, 1), {"method": "if", "projection": "none", "method_options": {"solver": "exact", "damping": 1.0}}),
    "arnoldi": (slice(0, 1), {"method": "arnoldi", "method_options": {"rank": 3, "damping": 1.0}}),
    "trak": (slice(0, 2), {"method": "trak", "projection": "rademacher", "proj_dim": 16}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_method_sees_a_two_input_model_as_its_one_input_twin(case, checkpoints, tmp_path):
    picked, options = CASES[case]
    one, two = _tasks()
    stores = {
        name: gradindex.build(task, checkpoints[picked], tmp_path / f"{name}.gradindex", dtype="float32", **options)
        for name, task in (("one", one), ("two", two))
    }
    np.testing.assert_allclose(stores["two"].read_features(), stores["one"].read_features(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        stores["two"].self_influence()[1], stores["one"].self_influence()[1], rtol=1e-5, atol=1e-6
    )
    answers = {
        name: gradindex.query(stores[name], task, k=4, progress=False) for name, task in (("one", one), ("two", two))
    }
    assert answers["two"].column("row").to_pylist() == answers["one"].column("row").to_pylist()
    np.testing.assert_allclose(
        answers["two"].column("score").to_numpy(), answers["one"].column("score").to_numpy(), rtol=1e-4, atol=1e-6
    )
    assert answers["two"].num_rows == N_TEST * 4


def test_the_batch_rule_counts_samples_not_inputs():
    _, two = _tasks()
    batch = torch.utils.data.default_collate([two.train[i] for i in range(7)])
    assert gradindex.task.batch_size(batch) == 7
    assert gradindex.task.batch_size(gradindex.task.slice_batch(batch, 2, 5)) == 3
