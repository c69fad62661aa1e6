"""GEX's la_kfac: ensemble members drawn from a K-FAC Laplace posterior around θ* (``make_ensemble(laplace=True)``)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import TensorDataset

import gradindex
from gradindex.ensemble import kfac_laplace, load_ensemble
from gradindex.errors import ArgumentError
from tests.tiny_tasks import mlp_task


def _tiny_task(n_samples: int = 40, in_dim: int = 3) -> gradindex.Task:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(n_samples, in_dim, generator=generator)
    targets = torch.randint(0, 2, (n_samples,), generator=generator)
    return gradindex.Task(
        model=lambda: nn.Sequential(nn.Linear(in_dim, 2)), train=TensorDataset(inputs, targets), name="tiny-layer"
    )


def test_factors_are_the_layer_fisher_factors():
    task = _tiny_task()
    torch.manual_seed(1)
    model = task.model()
    posterior = kfac_laplace(task, model, prior_precision=1.0, batch_size=7)
    inputs, targets = task.train.tensors
    augmented = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1).double()
    a_expected = augmented.T @ augmented / len(inputs)
    g_rows = []
    for row in range(len(inputs)):  # trusted slow path: ∂ℓ/∂logits by backward(), one sample at a time
        logits = model(inputs[row : row + 1]).detach().requires_grad_(True)
        nn.functional.cross_entropy(logits, targets[row : row + 1]).backward()
        g_rows.append(logits.grad[0].double())
    g = torch.stack(g_rows)
    a, g_found = posterior.factors["0"]
    torch.testing.assert_close(a, a_expected)
    torch.testing.assert_close(g_found, g.T @ g / len(inputs))
    assert posterior.layers == {"0": ("0.weight", "0.bias", False)} and posterior.diagonal == {}


def test_draws_have_the_kfac_posterior_covariance():
    """The sample covariance of many draws of vec([δW, δb]) matches the analytic (N·G ⊗ A + τI)^-1."""
    task = _tiny_task()
    torch.manual_seed(2)
    model = task.model()
    with torch.no_grad():
        model[0].weight.mul_(3)  # confident enough that G is not tiny next to τ/N
    posterior = kfac_laplace(task, model, prior_precision=0.5)
    generator = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(20_000):
        delta = posterior.draw(generator)
        draws.append(torch.cat([delta["0.weight"], delta["0.bias"][:, None]], dim=1).reshape(-1))
    samples = torch.stack(draws)
    expected = posterior.covariance("0")
    found = torch.cov(samples.T)
    assert float((found - expected).abs().max()) < 0.04 * float(expected.abs().max())
    # and it is not the prior's: the data shrank some directions well below 1/τ
    assert float(torch.linalg.eigvalsh(expected).min()) < 0.5 / 0.5


def test_diagonal_for_parameters_outside_linear_layers():
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(30, 4, generator=generator), torch.randint(0, 3, (30,), generator=generator)
    task = gradindex.Task(
        model=lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)),
        train=TensorDataset(inputs, targets),
    )
    torch.manual_seed(0)
    model = task.model()
    posterior = kfac_laplace(task, model, prior_precision=1.0)
    assert sorted(posterior.diagonal) == ["1.bias", "1.weight"]
    expected = torch.zeros(5, dtype=torch.float64)
    for row in range(30):
        model.zero_grad()
        task.loss(model, (inputs[row : row + 1], targets[row : row + 1])).sum().backward()
        expected += model[1].weight.grad.double() ** 2
    torch.testing.assert_close(posterior.diagonal["1.weight"], expected / 30)
    delta = posterior.draw(torch.Generator().manual_seed(1))
    assert {name: tuple(value.shape) for name, value in delta.items()} == {
        name: tuple(param.shape) for name, param in model.named_parameters()
    }


def test_wide_layer_is_refused():
    task = _tiny_task(n_samples=4, in_dim=4097)
    with pytest.raises(ArgumentError, match="K-FAC Laplace is for small models.*geometric ensemble"):
        kfac_laplace(task, task.model(), prior_precision=1.0)


def test_laplace_ensemble_builds_a_gex_store(tmp_path):
    task = mlp_task(n_train=48, n_test=6)
    torch.manual_seed(0)
    base = tmp_path / "final.pt"
    torch.save(task.model().state_dict(), base)
    made = gradindex.make_ensemble(task, base, tmp_path / "la", members=4, laplace=True)
    assert len(made.members) == 4 and all(0 < distance < float("inf") for distance in made.distances)
    manifest = __import__("json").loads((tmp_path / "la" / "ensemble.json").read_text())
    assert 1e-6 <= manifest["prior_precision"] <= 1e8
    again = load_ensemble(tmp_path / "la")
    assert again.config.laplace and again.members == made.members
    twice = gradindex.make_ensemble(task, base, tmp_path / "la2", members=4, laplace=True)  # seeded: the same draws
    first, second = torch.load(made.members[0]), torch.load(twice.members[0])
    assert all(torch.equal(first[key], second[key]) for key in first)
    store = gradindex.build(
        task, made.gex_checkpoints(), tmp_path / "gex.gradindex", method="gex", progress=False, device="cpu"
    )
    assert store.n_samples == 48 and store.fingerprint["block_dim"] == 4


def test_cli_ensemble_laplace(tmp_path):
    from gradindex.cli import cli

    result = CliRunner().invoke(cli, ["ensemble", "--help"])
    assert "--laplace" in result.output and "--prior-precision" in result.output
    torch.manual_seed(0)
    from tests.tiny_tasks import TINY, mlp

    base = tmp_path / "final.pt"
    torch.save(mlp().state_dict(), base)
    args = ["ensemble", "--task", f"{TINY}:mlp_task", "--checkpoint", str(base), "--members", "2", "-o"]
    missing = CliRunner().invoke(cli, [*args, str(tmp_path / "ge")])
    assert missing.exit_code != 0 and "needs --steps and --lr" in missing.output
    made = CliRunner().invoke(cli, [*args, str(tmp_path / "la"), "--laplace"])
    assert made.exit_code == 0, made.output
    assert "K-FAC Laplace draws" in made.output and "--method gex" in made.output
