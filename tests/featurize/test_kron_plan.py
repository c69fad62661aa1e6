"""The calibrated kron plan: computed once by a build from gradient energies, then only ever read from the manifest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradindex
from featurize import kron_models
from gradindex.checkpoints import parse_checkpoints
from gradindex.featurize import KronGradients, TracInFeaturizer, load_checkpoints
from gradindex.pipeline import _query_featurizer
from gradindex.project import KronLayer, KronPlan, ProjectionSpec, kron_side_matrix, plan_kron

LAYERS = [KronLayer("0", "linear", ("0.weight", "0.bias"), 785, 256), KronLayer("2", "linear", ("2.weight", "2.bias"), 257, 10)]


def test_energies_move_dimensions_to_where_the_gradient_is():
    shape_only = plan_kron(1024, LAYERS)
    calibrated = plan_kron(1024, LAYERS, energies=[1.0, 9.0], sides="orthogonal")
    assert calibrated == plan_kron(1024, LAYERS, energies=[1.0, 9.0], sides="orthogonal")
    assert calibrated.dim <= 1024 and calibrated.layers[1].dim > shape_only.layers[1].dim
    assert calibrated.layers[1].k_out == 10  # a narrow side is kept whole once the share allows it
    # what the manifest records comes back as the same plan; it must fit the model it is used with
    entries = calibrated.to_dict()
    assert entries[0]["sides"] == "orthogonal"
    assert KronPlan.from_dict(entries, LAYERS) == calibrated
    with pytest.raises(ValueError, match="does not fit this model"):
        KronPlan.from_dict(entries, LAYERS[:1])
    with pytest.raises(ValueError, match="2 energies for 3 parameter groups"):
        plan_kron(1024, LAYERS, ("scale",), 1, energies=[1.0, 2.0])
    damaged = [dict(entries[0], k_in=10_000), entries[1]]  # wider than the layer
    with pytest.raises(ValueError, match=r"recorded kron plan of 0 is invalid .*edited or damaged; rebuild the store with --overwrite"):
        KronPlan.from_dict(damaged, LAYERS)
    with pytest.raises(ValueError, match="kron sides must be one of gaussian, orthogonal, got 'pca'"):
        plan_kron(1024, LAYERS, sides="pca")


def test_orthogonal_sides_have_orthogonal_columns_and_full_sides_are_the_identity():
    side = kron_side_matrix(3, 0, LAYERS[0], "in", 40, "orthogonal")
    torch.testing.assert_close(side.T @ side, torch.eye(40) * (785 / 40), rtol=1e-5, atol=1e-4)
    assert torch.equal(side, kron_side_matrix(3, 0, LAYERS[0], "in", 40, "orthogonal"))
    assert kron_side_matrix(3, 0, LAYERS[1], "out", 10, "orthogonal") is None


def _skew_calibration(monkeypatch):
    """From here on, calibration finds nearly all the gradient energy in the first layer (as other data might)."""
    energies = KronGradients.energies
    monkeypatch.setattr(KronGradients, "energies", lambda self, *args: [value * (1e6 if group == 0 else 1.0) for group, value in enumerate(energies(self, *args))])


def _mlp_setup(tmp_path, n_train=40):
    task = kron_models.task("mlp", n_train=n_train, n_test=4)
    checkpoints = [kron_models.trained_checkpoint(task, tmp_path / "mlp.pt", steps=20)]
    return task, checkpoints


def test_queries_read_the_plan_from_the_manifest(tmp_path, monkeypatch):
    task, checkpoints = _mlp_setup(tmp_path)
    store = gradindex.build(task, checkpoints, tmp_path / "a.gradindex", proj_dim=256, dtype="float32", rows_per_shard=16)
    recorded = store.fingerprint["projection"]["plan"]
    assert all(entry["sides"] == "orthogonal" for entry in recorded if "module" in entry)
    # other calibration data would give another plan ...
    _skew_calibration(monkeypatch)
    other = gradindex.build(task, checkpoints, tmp_path / "b.gradindex", proj_dim=256, dtype="float32")
    assert other.fingerprint["projection"]["plan"] != recorded
    # ... but a query never calibrates: it featurizes with the store's plan and gets the stored vectors back
    monkeypatch.setattr(TracInFeaturizer, "_calibrate", lambda self: pytest.fail("a query must not plan again"))
    featurizer, _ = _query_featurizer(store, task, None, torch.device("cpu"))
    assert featurizer.fingerprint()["projection"]["plan"] == recorded
    np.testing.assert_allclose(featurizer.featurize(task.train.tensors).numpy(), store.read_features(), rtol=1e-5, atol=1e-7)
    assert gradindex.query(store, task, samples=[0, 1], k=3).num_rows == 6


def test_two_builds_are_identical_and_late_workers_take_the_recorded_plan(tmp_path, monkeypatch):
    task, checkpoints = _mlp_setup(tmp_path)
    options = {"proj_dim": 256, "dtype": "float32", "rows_per_shard": 10}
    first = gradindex.build(task, checkpoints, tmp_path / "one.gradindex", **options)
    second = gradindex.build(task, checkpoints, tmp_path / "two.gradindex", **options)
    assert first.fingerprint["projection"] == second.fingerprint["projection"]
    assert first.read_features().tobytes() == second.read_features().tobytes()
    # worker 0 of 2 creates the store; worker 1 would calibrate differently, but joins with the store's plan
    gradindex.build(task, checkpoints, tmp_path / "split.gradindex", shard=(0, 2), **options)
    _skew_calibration(monkeypatch)
    split = gradindex.build(task, checkpoints, tmp_path / "split.gradindex", shard=(1, 2), **options)
    assert split.complete and split.fingerprint["projection"] == first.fingerprint["projection"]
    assert split.read_features().tobytes() == first.read_features().tobytes()
    resumed = gradindex.build(task, checkpoints, tmp_path / "split.gradindex", resume=True, **options)
    assert resumed.complete


def test_a_plan_recorded_before_calibration_still_gives_its_vectors(tmp_path, monkeypatch):
    """Stores from before the calibrated plan record a shape-only plan with Gaussian sides (no "sides" entry)."""
    task, checkpoints = _mlp_setup(tmp_path)
    loaded = load_checkpoints(task, parse_checkpoints(checkpoints), torch.device("cpu"))
    old_entries = plan_kron(256, [KronLayer("0", "linear", ("0.weight", "0.bias"), 65, 128),
                                  KronLayer("2", "linear", ("2.weight", "2.bias"), 129, 10)]).to_dict()
    assert all("sides" not in entry for entry in old_entries)
    recorded = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="kron", dim=256, plan=tuple(old_entries)))
    assert recorded.fingerprint()["projection"]["plan"] == old_entries
    monkeypatch.setattr(TracInFeaturizer, "_calibrate", lambda self: None)  # the old behaviour: plan from shapes
    legacy = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="kron", dim=256))
    assert legacy.fingerprint()["projection"]["plan"] == old_entries
    inputs = task.train.tensors
    assert torch.equal(recorded.featurize(inputs), legacy.featurize(inputs))


@pytest.mark.parametrize("name", ["cnn", "lm"])
def test_calibration_energies_equal_the_exact_per_sample_gradient_norms(name, tmp_path):
    """What the plan is computed from (per group Σ_b |G_b|², via Gram matrices or the gradient itself) against vmap."""
    task = kron_models.task(name, n_train=12, n_test=2)
    checkpoints = [kron_models.trained_checkpoint(task, tmp_path / "c.pt", steps=5)]
    loaded = load_checkpoints(task, parse_checkpoints(checkpoints), torch.device("cpu"))
    exact = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="none"))
    kron = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="kron", dim=64))
    vectors = exact.featurize(task.train.tensors).double()
    squared = {plan.name: vectors[:, plan.offset : plan.offset + plan.numel].square().sum() for plan in exact.plans}
    layers, rest, _ = kron.kron._groups
    expected = [sum(squared[param] for param in layer.params) for layer in layers] + ([sum(squared[param] for param in rest)] if rest else [])
    found = kron.kron.energies(task.train.tensors, loaded[0].state)
    assert len(found) == len(expected) > 2
    np.testing.assert_allclose(found, [float(value) for value in expected], rtol=1e-4)


def test_squared_norms_agree_through_grams_and_through_the_gradient():
    from gradindex.featurize._kron import _squared_norms

    generator = torch.Generator().manual_seed(0)
    for length, in_dim, out_dim in ((1, 30, 20), (50, 3, 2), (6, 40, 30)):
        a, g = torch.randn(5, length, in_dim, generator=generator), torch.randn(5, length, out_dim, generator=generator)
        explicit = (g.transpose(1, 2) @ a).square().sum((1, 2)).double()
        torch.testing.assert_close(_squared_norms("linear", a, g, in_dim), explicit, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_squared_norms("linear", a, g, in_dim, elements=1), explicit, rtol=1e-5, atol=1e-6)  # chunked
    tokens = torch.tensor([[1, 2, 1, 3], [0, 0, 2, 2]])
    g = torch.randn(2, 4, 5, generator=generator)
    # the embedding's per-sample gradient: its rows, by token
    by_token = torch.stack([torch.zeros(4, 5).index_add_(0, tokens[b], g[b]) for b in range(2)])
    torch.testing.assert_close(_squared_norms("embedding", tokens, g, 4), by_token.square().sum((1, 2)).double(), rtol=1e-5, atol=1e-6)
