"""GEX: vectors and self-influence against the formula computed directly from per-member losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tiny_tasks
import torch

import gradindex
from gradindex.checkpoints import parse_checkpoints


def _losses(task, checkpoint: str, split: str) -> np.ndarray:
    """Per-sample cross-entropy of a checkpoint, one sample at a time."""
    model = task.model()
    model.load_state_dict(torch.load(parse_checkpoints([checkpoint])[0].path))
    model.eval()
    dataset = task.split(split)
    with torch.no_grad():
        return np.array(
            [
                float(torch.nn.functional.cross_entropy(model(dataset[i][0].unsqueeze(0)), dataset[i][1].unsqueeze(0)))
                for i in range(len(dataset))
            ]
        )


def _formula(task, checkpoints, split: str, tau: float) -> np.ndarray:
    base = _losses(task, checkpoints[0], split)
    members = np.stack([_losses(task, checkpoint, split) for checkpoint in checkpoints[1:]], axis=1)
    return (members - np.maximum(base, tau)[:, None]) / math.sqrt(members.shape[1])


@pytest.fixture
def ensemble(tmp_path):
    """θ* and three members: four checkpoints of the tiny MLP."""
    return tiny_tasks.save_checkpoints(tiny_tasks.mlp, tmp_path, weights=(1.0, 1.0, 1.0, 1.0))


def test_gex_vectors_and_self_influence_equal_the_formula(tmp_path, ensemble):
    task = tiny_tasks.mlp_task(n_train=50, n_test=5)
    base_losses = _losses(task, ensemble[0], "train")
    tau = float(np.median(base_losses))  # half the samples are floored at τ
    store = gradindex.build(
        task,
        ensemble,
        tmp_path / "g.gradindex",
        method="gex",
        dtype="float32",
        rows_per_shard=20,
        method_options={"tau": tau},
    )
    assert store.dim == 3
    assert store.fingerprint["method"] == {"name": "gex", "normalize": False, "tau": tau}
    phi = _formula(task, ensemble, "train", tau)
    np.testing.assert_allclose(store.read_features(), phi, rtol=1e-5, atol=1e-6)
    _rows, self_scores = store.self_influence()
    # the mean squared deviation of the members' losses from max(ℓ(θ*), τ)
    np.testing.assert_allclose(self_scores, (phi**2).sum(axis=1), rtol=1e-5)
    members = phi * math.sqrt(3)
    np.testing.assert_allclose(self_scores, (members**2).mean(axis=1), rtol=1e-5)
    # queries: the same φ of the test samples, inner products over the store
    query = _formula(task, ensemble, "test", tau)[[0, 2]]
    table = gradindex.query(store, task, samples=[0, 2], k=50)
    scores = np.empty((2, 50))
    scores[table.column("query").to_numpy(), table.column("row").to_numpy()] = table.column("score").to_numpy()
    np.testing.assert_allclose(scores, query @ phi.T, rtol=1e-4, atol=1e-6)


def test_gex_default_tau_and_build_errors(tmp_path, ensemble):
    task = tiny_tasks.mlp_task(n_train=20, n_test=2)
    store = gradindex.build(task, ensemble[:3], tmp_path / "d.gradindex", method="gex", dtype="float32")
    assert store.fingerprint["method"]["tau"] == 0.0  # no floor by default: plain loss deviations
    np.testing.assert_allclose(store.read_features(), _formula(task, ensemble[:3], "train", 0.0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="θ\\* first and then the ensemble members"):
        gradindex.build(task, ensemble[:1], tmp_path / "a.gradindex", method="gex")
    with pytest.raises(ValueError, match="normalize=True does not apply to method=gex"):
        gradindex.build(task, ensemble, tmp_path / "b.gradindex", method="gex", normalize=True)
    with pytest.raises(ValueError, match="layers do not apply to method=gex"):
        gradindex.build(task, ensemble, tmp_path / "c.gradindex", method="gex", layers=("0.*",))
    with pytest.raises(ValueError, match="tau must be a non-negative number, got -1"):
        gradindex.build(task, ensemble, tmp_path / "e.gradindex", method="gex", method_options={"tau": -1})
    with pytest.raises(gradindex.IncompatibleStoreError, match="tau=0.0; this query asks for tau=0.2"):
        gradindex.query(store, task, samples=[0], method_options={"tau": 0.2})


def test_a_build_dominated_by_tau_warns_and_names_the_fix(tmp_path, ensemble):
    """τ dominates a sample when max(τ − ℓ(θ*), 0) exceeds the root mean square of its members' loss changes; more
    than half the training samples so dominated make a warning (here τ is far above every loss)."""
    import warnings

    task = tiny_tasks.mlp_task(n_train=40, n_test=2)
    base = _losses(task, ensemble[0], "train")
    members = np.stack([_losses(task, checkpoint, "train") for checkpoint in ensemble[1:]], axis=1)
    change = np.sqrt(((members - base[:, None]) ** 2).mean(axis=1))
    tau = float(np.max(base + change)) * 2
    assert (np.maximum(tau - base, 0) > change).mean() > 0.5  # the warning's threshold (TAU_DOMINATED)
    with pytest.warns(
        gradindex.GradIndexWarning, match=r"dominated by tau=\S+ for 100% of the training samples.*--tau 0"
    ):
        gradindex.build(task, ensemble, tmp_path / "t.gradindex", method="gex", method_options={"tau": tau})
    # the floor below every sample's change: no warning, also not at the default τ = 0
    low = float(np.min(base)) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradindex.GradIndexWarning)
        gradindex.build(task, ensemble, tmp_path / "z.gradindex", method="gex")
        gradindex.build(task, ensemble, tmp_path / "l.gradindex", method="gex", method_options={"tau": low})
