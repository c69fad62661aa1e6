"""The calibrated kron plan: computed once by a build from gradient energies, then only ever read from the manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from featurize import kron_models

import gradindex
from gradindex.checkpoints import parse_checkpoints
from gradindex.featurize import KronGradients, load_checkpoints
from gradindex.methods import TracInFeaturizer
from gradindex.pipeline import query_featurizer as _query_featurizer
from gradindex.projection import (
    PCA_MAX_SIDE,
    KronLayer,
    KronPlan,
    ProjectionSpec,
    SideSketch,
    kron_side_matrix,
    pca_side_matrix,
    plan_kron,
)
from gradindex.store import write_manifest as _write_manifest

LAYERS = [
    KronLayer("0", "linear", ("0.weight", "0.bias"), 785, 256),
    KronLayer("2", "linear", ("2.weight", "2.bias"), 257, 10),
]


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
    with pytest.raises(
        ValueError, match=r"recorded kron plan of 0 is invalid .*edited or damaged; rebuild the store with overwrite"
    ):
        KronPlan.from_dict(damaged, LAYERS)
    with pytest.raises(ValueError, match="kron sides must be one of gaussian, orthogonal, pca, got 'random'"):
        plan_kron(1024, LAYERS, sides="random")
    with pytest.raises(ValueError, match="kron_sides applies to projection=kron only, not projection=sjlt"):
        ProjectionSpec(kind="sjlt", kron_sides="pca")
    # pca sides: recorded per layer; a layer with a side too wide to decompose draws orthogonal sides instead
    wide = KronLayer("head", "linear", ("head.weight",), 64, PCA_MAX_SIDE + 1)
    mixed = plan_kron(512, [LAYERS[0], wide], energies=[1.0, 1.0], sides="pca")
    assert [plan.sides for plan in mixed.layers] == ["pca", "orthogonal"]
    assert KronPlan.from_dict(mixed.to_dict(), [LAYERS[0], wide]) == mixed
    with pytest.raises(ValueError, match="the pca sides of 0 come from calibration data"):
        kron_side_matrix(3, 0, LAYERS[0], "in", 40, "pca")


def test_pca_side_matrices_are_the_top_eigenvectors_with_fixed_signs():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=generator, dtype=torch.float64) * torch.tensor(
        [5.0, 1.0, 3.0, 0.5, 2.0, 0.1], dtype=torch.float64
    )
    moment = x.T @ x
    side = pca_side_matrix(moment, 3)
    assert side.shape == (6, 3) and side.dtype == torch.float32
    torch.testing.assert_close(side.T @ side, torch.eye(3), atol=1e-6, rtol=0)
    values = torch.linalg.eigvalsh(moment).flip(0)
    torch.testing.assert_close(torch.diagonal(side.double().T @ moment @ side.double()), values[:3], rtol=1e-5, atol=0)
    assert bool((side.gather(0, side.abs().argmax(0, keepdim=True)) > 0).all())  # each column's largest entry positive
    assert torch.equal(pca_side_matrix(moment, 3), pca_side_matrix(moment.neg().neg(), 3))
    # a diagonal moment (an embedding's per-token energies): the indicator columns of the k largest, ties to the lower
    # index
    counts = pca_side_matrix(torch.tensor([0.0, 5.0, 1.0, 5.0, 2.0]), 3)
    assert counts.argmax(0).tolist() == [1, 3, 4] and counts.sum().item() == 3.0


def test_orthogonal_sides_have_orthogonal_columns_and_full_sides_are_the_identity():
    side = kron_side_matrix(3, 0, LAYERS[0], "in", 40, "orthogonal")
    torch.testing.assert_close(side.T @ side, torch.eye(40) * (785 / 40), rtol=1e-5, atol=1e-4)
    assert torch.equal(side, kron_side_matrix(3, 0, LAYERS[0], "in", 40, "orthogonal"))
    assert kron_side_matrix(3, 0, LAYERS[1], "out", 10, "orthogonal") is None


def _skew_calibration(monkeypatch):
    """From here on, calibration finds nearly all the gradient energy in the first layer, and other top directions
    on every side (as other data, or another machine's eigensolver, might)."""
    calibrate_batch = KronGradients.calibrate_batch

    def skewed(self, batch, state, moments, *args, **kwargs):
        found = calibrate_batch(self, batch, state, moments, *args, **kwargs)
        for key, value in moments.items():
            if isinstance(value, SideSketch):
                value.y += value.omega.to(value.y) * value.y.abs().max() * 1e3
            elif key[1] in ("flat", "rest"):  # a flat group's calibration vectors, [samples, width]
                moments[key] = value.flip(1)
            elif value.ndim == 2:
                moments[key] = value + torch.diag(torch.arange(value.shape[0], dtype=value.dtype)) * 1e3
            else:
                moments[key] = value.flip(0)
        return [value * (1e6 if group == 0 else 1.0) for group, value in enumerate(found)]

    monkeypatch.setattr(KronGradients, "calibrate_batch", skewed)


def _mlp_setup(tmp_path, n_train=40):
    task = kron_models.task("mlp", n_train=n_train, n_test=4)
    checkpoints = [kron_models.trained_checkpoint(task, tmp_path / "mlp.pt", steps=20)]
    return task, checkpoints


def test_queries_read_the_plan_from_the_manifest(tmp_path, monkeypatch):
    task, checkpoints = _mlp_setup(tmp_path)
    store = gradindex.build(
        task, checkpoints, tmp_path / "a.gradindex", proj_dim=256, dtype="float32", rows_per_shard=16
    )
    recorded = store.fingerprint["projection"]["plan"]
    assert all(entry["sides"] == "pca" for entry in recorded if "module" in entry)
    assert "kron_sides" in store.transforms()
    # other calibration data would give another plan and other pca sides ...
    _skew_calibration(monkeypatch)
    other = gradindex.build(task, checkpoints, tmp_path / "b.gradindex", proj_dim=256, dtype="float32")
    assert other.fingerprint["projection"]["plan"] != recorded
    # ... but a query never calibrates: it featurizes with the store's plan and sides and gets the stored vectors back
    monkeypatch.setattr(TracInFeaturizer, "_calibrate", lambda self, sides: pytest.fail("a query must not plan again"))
    monkeypatch.setattr(
        TracInFeaturizer, "_calibrate_pca", lambda self: pytest.fail("a query must not compute pca sides")
    )
    featurizer, _ = _query_featurizer(store, task, None, torch.device("cpu"))
    assert featurizer.fingerprint()["projection"]["plan"] == recorded
    with pytest.raises(
        RuntimeError, match=r"pca side matrices of 0 are not loaded: .* attach the featurizer to its store first"
    ):
        featurizer.featurize(task.train.tensors)
    featurizer.attach(store)
    np.testing.assert_allclose(
        featurizer.featurize(task.train.tensors).numpy(), store.read_features(), rtol=1e-5, atol=1e-7
    )
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
    old_entries = plan_kron(
        256,
        [
            KronLayer("0", "linear", ("0.weight", "0.bias"), 65, 128),
            KronLayer("2", "linear", ("2.weight", "2.bias"), 129, 10),
        ],
    ).to_dict()
    assert all("sides" not in entry for entry in old_entries)
    recorded = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="kron", dim=256, plan=tuple(old_entries)))
    assert recorded.fingerprint()["projection"]["plan"] == old_entries
    monkeypatch.setattr(TracInFeaturizer, "_calibrate", lambda self, sides: None)  # the old behaviour: plan from shapes
    legacy = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="kron", dim=256))
    # the same plan, now with each group's path and why
    described = legacy.fingerprint()["projection"]["plan"]
    assert [{key: entry[key] for key in old} for entry, old in zip(described, old_entries)] == old_entries
    assert [entry["path"] for entry in described] == ["factored", "factored"]
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
    expected = [sum(squared[param] for param in layer.params) for layer in layers] + (
        [sum(squared[param] for param in rest)] if rest else []
    )
    found = kron.kron.energies(task.train.tensors, loaded[0].state)
    assert len(found) == len(expected) > 2
    np.testing.assert_allclose(found, [float(value) for value in expected], rtol=1e-4)


def test_squared_norms_agree_through_grams_and_through_the_gradient():
    from gradindex.featurize import squared_norms as _squared_norms

    generator = torch.Generator().manual_seed(0)
    for length, in_dim, out_dim in ((1, 30, 20), (50, 3, 2), (6, 40, 30)):
        a, g = torch.randn(5, length, in_dim, generator=generator), torch.randn(5, length, out_dim, generator=generator)
        explicit = (g.transpose(1, 2) @ a).square().sum((1, 2)).double()
        torch.testing.assert_close(_squared_norms("linear", a, g, in_dim), explicit, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            _squared_norms("linear", a, g, in_dim, elements=1), explicit, rtol=1e-5, atol=1e-6
        )  # chunked
    tokens = torch.tensor([[1, 2, 1, 3], [0, 0, 2, 2]])
    g = torch.randn(2, 4, 5, generator=generator)
    # the embedding's per-sample gradient: its rows, by token
    by_token = torch.stack([torch.zeros(4, 5).index_add_(0, tokens[b], g[b]) for b in range(2)])
    torch.testing.assert_close(
        _squared_norms("embedding", tokens, g, 4), by_token.square().sum((1, 2)).double(), rtol=1e-5, atol=1e-6
    )


def test_pca_side_moments_are_the_gradients_second_moments(tmp_path):
    """For a layer applied once per sample (G_b = g_b a_bᵀ) the weighted moments are exact: Σ_b G_bᵀ G_b on the input
    side and Σ_b G_b G_bᵀ on the output side, against the per-sample gradients of vmap."""
    task, checkpoints = _mlp_setup(tmp_path, n_train=24)
    loaded = load_checkpoints(task, parse_checkpoints(checkpoints), torch.device("cpu"))
    exact = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="none"))
    kron = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="kron", dim=64))
    vectors = exact.featurize(task.train.tensors).double()
    moments: dict = {}
    kron.kron.side_moments(task.train.tensors, loaded[0].state, moments)
    plans = {plan.name: plan for plan in exact.plans}
    checked = 0
    for plan in kron.kron.plan.layers:
        weight, bias = (plans[name] for name in plan.layer.params)
        grads = torch.cat(
            [
                vectors[:, weight.offset : weight.offset + weight.numel].reshape(-1, *weight.shape),
                vectors[:, bias.offset : bias.offset + bias.numel].unsqueeze(2),
            ],
            dim=2,
        )  # [B, out, in]
        expected = {"in": torch.einsum("boi,boj->ij", grads, grads), "out": torch.einsum("boi,bpi->op", grads, grads)}
        for side, _, _ in plan.narrow_sides():
            torch.testing.assert_close(moments[(plan.layer.name, side)], expected[side], rtol=1e-4, atol=1e-8)
            checked += 1
    assert checked >= 2


def test_a_damaged_or_missing_kron_sides_transform_is_named(tmp_path):
    task, checkpoints = _mlp_setup(tmp_path)
    store = gradindex.build(task, checkpoints, tmp_path / "a.gradindex", proj_dim=256, dtype="float32")
    featurizer, _ = _query_featurizer(store, task, None, torch.device("cpu"))
    packed = store.read_transform("kron_sides")
    store.write_transform("kron_sides", packed[:-1])
    with pytest.raises(
        gradindex.CorruptStoreError,
        match=r"kron_sides holds float32 \[\d+\], but its kron plan needs float32 \[\d+\]; rebuild it with overwrite",
    ):
        featurizer.attach(store)
    manifest = json.loads((store.path / "zarr.json").read_text())["attributes"]["gradindex"]
    del manifest["transforms"]["kron_sides"]  # the manifest lost the record (an edited or half-copied store)
    _write_manifest(store.path, manifest)
    with pytest.raises(
        gradindex.CorruptStoreError,
        match="built with pca kron sides but holds no transforms/kron_sides; rebuild it with overwrite=True",
    ):
        featurizer.attach(gradindex.open_store(store.path))


def test_resuming_with_other_kron_sides_is_refused_and_appends_keep_the_sides(tmp_path):
    task, checkpoints = _mlp_setup(tmp_path, n_train=40)
    options = {"proj_dim": 256, "dtype": "float32", "rows_per_shard": 10}
    gradindex.build(task, checkpoints, tmp_path / "split.gradindex", shard=(0, 2), **options)
    with pytest.raises(
        gradindex.IncompatibleStoreError,
        match="built with kron sides pca, not orthogonal; continue it with kron_sides=pca",
    ):
        gradindex.build(
            task, checkpoints, tmp_path / "split.gradindex", shard=(1, 2), kron_sides="orthogonal", **options
        )
    whole = gradindex.build(task, checkpoints, tmp_path / "split.gradindex", shard=(1, 2), kron_sides="pca", **options)
    assert whole.complete
    # an append featurizes the new rows with the store's sides: the same vectors a build of the grown set gives
    grown = kron_models.task("mlp", n_train=50, n_test=4)
    assert torch.equal(grown.train.tensors[0][:40], task.train.tensors[0])
    appended = gradindex.build(grown, checkpoints, tmp_path / "split.gradindex", append=True, **options)
    assert appended.complete and appended.n_samples == 50
    featurizer, _ = _query_featurizer(appended, grown, None, torch.device("cpu"))
    featurizer.attach(appended)
    np.testing.assert_allclose(
        featurizer.featurize(grown.train.tensors).numpy(), appended.read_features(), rtol=1e-5, atol=1e-7
    )


def test_pca_moments_in_blocks_and_groups_match_one_pass(tmp_path):
    """Bounded memory: moments taken a few positions at a time, and sides gathered a group at a time under a small
    featurization budget, give the same moments and the same pca vectors as one pass over everything."""
    base = kron_models.task("lm", n_train=24, n_test=2)  # 24 samples: layers of up to 16 x 24 entries are flat
    # a vocabulary of 160: an embedding too large to project flat (5,120 entries), so factored, its token side diagonal
    task = gradindex.Task(model=lambda: kron_models.TinyLM(vocab=160), train=base.train, loss=base.loss)
    checkpoints = [kron_models.trained_checkpoint(task, tmp_path / "lm.pt", steps=5)]
    loaded = load_checkpoints(task, parse_checkpoints(checkpoints), torch.device("cpu"))
    whole = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="kron", dim=128))
    shapes = whole.kron.pca_shapes()
    assert len(shapes) >= 4 and {"in", "out", "flat", "rest"} <= {side for _, side, _, _ in shapes}
    one, blocked = {}, {}
    whole.kron.side_moments(task.train.tensors, loaded[0].state, one)
    whole.kron.side_moments(task.train.tensors, loaded[0].state, blocked, block=7)
    assert one.keys() == blocked.keys() == {(name, side) for name, side, _, _ in shapes}
    assert one[("embed", "in")].ndim == 1  # the embedding's token side: a diagonal moment
    assert all(one[(name, side)].shape == (24, width) for name, side, width, _ in shapes if side in ("flat", "rest"))
    assert whole.kron.pca_groups(1 << 40) == [shapes] and whole.kron.pca_groups(1) == [[shape] for shape in shapes]
    for key in one:  # float32 products per block, summed in float64: equal to float32 rounding of the largest entry
        scale = float(one[key].abs().max())
        torch.testing.assert_close(blocked[key], one[key], rtol=1e-5, atol=1e-6 * scale)
    grouped = TracInFeaturizer(
        task, loaded, projection=ProjectionSpec(kind="kron", dim=128), chunk_bytes=1
    )  # one side per pass
    assert grouped.fingerprint()["projection"]["plan"] == whole.fingerprint()["projection"]["plan"]
    inputs = task.train.tensors
    torch.testing.assert_close(grouped.featurize(inputs), whole.featurize(inputs), rtol=1e-4, atol=1e-6)
