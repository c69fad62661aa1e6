"""TRAK against a direct dense computation of its formula, with gradients from a loop of backward() calls."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_tasks
import torch

import gradindex
from gradindex.checkpoints import parse_checkpoints
from gradindex.featurize import select_parameters
from gradindex.projection import ParamPlan, ProjectionSpec, make_projector

PROJ_DIM = 16
BUILD_DAMPING = 0.5
QUERIES = [0, 1, 2, 3]


def _margin_gradients(model: torch.nn.Module, dataset, names) -> tuple[np.ndarray, np.ndarray]:
    """``(∇_θ f(z) [n, p], f(z) [n])`` one sample at a time: f = logit of the label − logsumexp of the others."""
    params = dict(model.named_parameters())
    rows, margins = [], []
    for position in range(len(dataset)):
        inputs, target = dataset[position]
        logits = model(inputs.unsqueeze(0))[0]
        others = torch.cat([logits[:target], logits[target + 1 :]])
        margin = logits[target] - torch.logsumexp(others, dim=0)
        grads = torch.autograd.grad(margin, [params[name] for name in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double().numpy())
        margins.append(float(margin.detach()))
    return np.stack(rows), np.array(margins)


def _dense_trak(task, checkpoints, projection: ProjectionSpec, damping: float | None, normalize: bool = False):
    """The TRAK formula, computed densely: ``(scores [n_test, n_train], self_influence [n_train], grams [C, k, k])``."""
    specs = parse_checkpoints(checkpoints)
    model = task.model()
    names = select_parameters(model, None)
    shapes = dict(model.named_parameters())
    projector = make_projector(projection, ParamPlan.layout([(name, shapes[name].shape) for name in names]))
    n_params = sum(shapes[name].numel() for name in names)
    scores, self_scores, grams, out_to_loss = 0.0, 0.0, [], 0.0
    for position, spec in enumerate(specs):
        model.load_state_dict(torch.load(spec.path))
        matrix = projector.project(torch.eye(n_params), position).double().numpy()  # P_c: [p, k]
        train, train_margin = _margin_gradients(model, task.train, names)
        test, _ = _margin_gradients(model, task.test, names)
        phi, phi_test = train @ matrix, test @ matrix
        if normalize:
            phi /= np.linalg.norm(phi, axis=1, keepdims=True)
            phi_test /= np.linalg.norm(phi_test, axis=1, keepdims=True)
        gram = phi.T @ phi
        # damping None: "auto", 0.1 × the mean eigenvalue of this checkpoint's ΦᵀΦ
        lam = 0.1 * np.clip(np.linalg.eigvalsh(gram), 0, None).mean() if damping is None else damping
        inverse = np.linalg.inv(gram + lam * np.eye(len(gram)))
        scores = scores + phi_test @ inverse @ phi.T / len(specs)
        self_scores = self_scores + np.einsum("ij,jk,ik->i", phi, inverse, phi) / len(specs)
        out_to_loss = out_to_loss + 1 / (1 + np.exp(train_margin)) / len(specs)  # 1 − p(label) = σ(−f)
        grams.append(gram)
    return scores * out_to_loss[None, :], self_scores * out_to_loss, np.stack(grams)


def _all_scores(store, task, queries, **options) -> np.ndarray:
    table = gradindex.query(store, task, samples=queries, k=store.n_samples, **options)
    scores = np.full((len(queries), store.n_samples), np.nan)
    scores[table.column("query").to_numpy(), table.column("row").to_numpy()] = table.column("score").to_numpy()
    return scores


def _self_scores(table, n_rows) -> np.ndarray:
    scores = np.empty(n_rows)
    scores[table.column("row").to_numpy()] = table.column("score").to_numpy()
    return scores


@pytest.fixture(scope="module")
def trak_setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("trak")
    checkpoints = tiny_tasks.save_checkpoints(tiny_tasks.mlp, directory, weights=(1.0, 1.0))
    task = tiny_tasks.mlp_task(n_train=60, n_test=6)
    store = gradindex.build(
        task,
        checkpoints,
        directory / "trak.gradindex",
        method="trak",
        proj_dim=PROJ_DIM,
        dtype="float32",
        rows_per_shard=16,
        method_options={"damping": BUILD_DAMPING},
    )
    return task, checkpoints, store


def test_trak_scores_equal_the_dense_formula_at_any_damping(trak_setup):
    task, checkpoints, store = trak_setup
    assert store.n_shards == 4 and store.dim == 2 * PROJ_DIM
    assert {"trak_gram", "trak_out_to_loss", "self_influence"} <= set(store.transforms())
    projection = ProjectionSpec(kind="rademacher", dim=PROJ_DIM, seed=0)
    scores, self_scores, grams = _dense_trak(task, checkpoints, projection, BUILD_DAMPING)
    # the Gram matrices, summed over the four shards' parts
    np.testing.assert_allclose(store.read_transform("trak_gram"), grams, rtol=1e-5, atol=1e-6 * np.abs(grams).max())
    np.testing.assert_allclose(
        _all_scores(store, task, QUERIES), scores[QUERIES], rtol=1e-4, atol=1e-5 * np.abs(scores).max()
    )
    np.testing.assert_allclose(_self_scores(gradindex.self_influence(store), store.n_samples), self_scores, rtol=1e-4)
    # one index, another λ: only the query side changes
    other, other_self, _ = _dense_trak(task, checkpoints, projection, 0.02)
    np.testing.assert_allclose(
        _all_scores(store, task, QUERIES, damping=0.02), other[QUERIES], rtol=1e-4, atol=1e-5 * np.abs(other).max()
    )
    np.testing.assert_allclose(
        _self_scores(gradindex.self_influence(store, damping=0.02), store.n_samples), other_self, rtol=1e-4
    )
    # auto at query time on a store built with an absolute λ: 0.1 × the mean eigenvalue of each checkpoint's ΦᵀΦ
    auto, auto_self, _ = _dense_trak(task, checkpoints, projection, None)
    np.testing.assert_allclose(
        _all_scores(store, task, QUERIES, damping="auto"), auto[QUERIES], rtol=1e-4, atol=1e-5 * np.abs(auto).max()
    )
    np.testing.assert_allclose(
        _self_scores(gradindex.self_influence(store, damping="auto"), store.n_samples), auto_self, rtol=1e-4
    )


def test_trak_topk_through_faiss_equals_dense_scoring(trak_setup):
    task, checkpoints, store = trak_setup
    scores, _, _ = _dense_trak(
        task, checkpoints, ProjectionSpec(kind="rademacher", dim=PROJ_DIM, seed=0), BUILD_DAMPING
    )
    for opponents in (False, True):
        table = gradindex.query(store, task, samples=QUERIES, k=7, opponents=opponents)
        signed = -scores[QUERIES] if opponents else scores[QUERIES]
        expected_rows = np.argsort(-signed, axis=1, kind="stable")[:, :7]
        np.testing.assert_array_equal(table.column("row").to_numpy().reshape(len(QUERIES), 7), expected_rows)


def test_trak_workers_build_the_same_store(trak_setup, tmp_path):
    task, checkpoints, store = trak_setup
    path = tmp_path / "w.gradindex"
    options = dict(
        method="trak", proj_dim=PROJ_DIM, dtype="float32", rows_per_shard=16, method_options={"damping": BUILD_DAMPING}
    )
    first = gradindex.build(task, checkpoints, path, shard=(0, 2), **options)
    assert not first.complete
    with pytest.raises(gradindex.IncompleteStoreError, match="ΦᵀΦ"):
        gradindex.query(first, task, samples=[0], allow_incomplete=True)
    second = gradindex.build(task, checkpoints, path, shard=(1, 2), **options)
    assert second.complete
    for name in ("trak_gram", "trak_out_to_loss", "self_influence"):
        np.testing.assert_allclose(second.read_transform(name), store.read_transform(name), rtol=1e-6)
    np.testing.assert_array_equal(second.read_features(), store.read_features())


def test_trak_normalized_and_without_out_to_loss(tmp_path):
    checkpoints = tiny_tasks.save_checkpoints(tiny_tasks.mlp, tmp_path, weights=(1.0,))
    task = tiny_tasks.mlp_task(n_train=40, n_test=4)
    store = gradindex.build(
        task,
        checkpoints,
        tmp_path / "n.gradindex",
        method="trak",
        projection="none",
        normalize=True,
        dtype="float32",
        method_options={"damping": 0.1, "out_to_loss": False},
    )
    assert store.fingerprint["method"] == {"name": "trak", "normalize": True, "damping": 0.1, "out_to_loss": False}
    model = task.model()
    n_params = sum(param.numel() for param in model.parameters())
    scores, self_scores, _ = _dense_trak(
        task, checkpoints, ProjectionSpec(kind="none", dim=n_params), 0.1, normalize=True
    )
    # without the out-to-loss weights: divide the dense formula's back out
    model.load_state_dict(torch.load(parse_checkpoints(checkpoints)[0].path))
    _, margins = _margin_gradients(model, task.train, select_parameters(model, None))
    weights = 1 / (1 + np.exp(margins))
    np.testing.assert_allclose(_all_scores(store, task, [0, 1]), scores[:2] / weights, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(store.read_features(), axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        _self_scores(gradindex.self_influence(store), store.n_samples), self_scores / weights, rtol=1e-4
    )


@pytest.mark.parametrize("policy", ["skip", "zero"])
def test_nonfinite_rows_stay_out_of_the_gram_matrix(tmp_path, policy):
    """A NaN gradient (NaN inputs) stored as a zero / skipped row must not make ΦᵀΦ NaN: the Gram matrix equals
    the one built without those samples, and self-influence and queries stay finite."""
    from reliability import rel_tasks
    from torch.utils.data import TensorDataset

    nan_task = rel_tasks.nan_task()
    checkpoints = rel_tasks.save_checkpoints(tmp_path, count=2)
    options = dict(method="trak", projection="rademacher", proj_dim=PROJ_DIM, dtype="float32", rows_per_shard=128)
    store = gradindex.build(nan_task, checkpoints, tmp_path / f"{policy}.gradindex", nonfinite=policy, **options)
    keep = np.setdiff1d(np.arange(len(nan_task.train)), rel_tasks.nan_rows())
    x, y = nan_task.train.tensors
    clean = gradindex.Task(
        model=nan_task.model, train=TensorDataset(x[keep], y[keep]), test=nan_task.test, name="clean"
    )
    reference = gradindex.build(clean, checkpoints, tmp_path / "clean.gradindex", **options)
    gram = store.read_transform("trak_gram")
    assert np.isfinite(gram).all()
    np.testing.assert_allclose(gram, reference.read_transform("trak_gram"), rtol=1e-5, atol=1e-6 * np.abs(gram).max())
    self_scores = gradindex.self_influence(store).column("score").to_numpy()
    assert np.isfinite(self_scores).all()
    table = gradindex.query(store, nan_task, samples=[0, 1], k=10)
    assert np.isfinite(table.column("score").to_numpy()).all()
    assert not set(table.column("row").to_numpy().tolist()) & set(rel_tasks.nan_rows())


def test_trak_over_independent_runs_through_the_cli_glob_with_auto_damping(tmp_path):
    """TRAK-C from the command line: a quoted glob names the final checkpoints of C independently trained runs (sorted),
    and the default damping is auto (0.1 × each checkpoint's mean ΦᵀΦ eigenvalue), equal to the dense formula."""
    from click.testing import CliRunner

    from gradindex.cli import cli

    runs = []
    for run in range(3):
        folder = tmp_path / f"seed-{run}"
        folder.mkdir()
        torch.manual_seed(200 + run)
        torch.save(tiny_tasks.mlp().state_dict(), folder / "final.pt")
        runs.append(str(folder / "final.pt"))
    (tmp_path / "seed-x").mkdir()  # a run folder without the file: not a match
    store_path = tmp_path / "trak3.gradindex"
    task_spec = f"{tiny_tasks.__file__}:mlp_task"
    runner = CliRunner()
    pattern = str(tmp_path / "seed-*" / "final.pt")
    built = runner.invoke(
        cli,
        [
            *("build", "--task", task_spec, "--checkpoint", pattern, "-o", str(store_path)),
            *("--method", "trak", "--proj-dim", str(PROJ_DIM), "--dtype", "float32"),
        ],
    )
    assert built.exit_code == 0, built.output
    store = gradindex.open_store(store_path)
    assert [c["path"] for c in store.manifest["checkpoints"]] == runs
    assert store.fingerprint["method"]["damping"] is None
    task = tiny_tasks.mlp_task()
    scores, self_scores, _ = _dense_trak(task, runs, ProjectionSpec(kind="rademacher", dim=PROJ_DIM, seed=0), None)
    np.testing.assert_allclose(
        _all_scores(store, task, QUERIES), scores[QUERIES], rtol=1e-4, atol=1e-5 * np.abs(scores).max()
    )
    np.testing.assert_allclose(_self_scores(gradindex.self_influence(store), store.n_samples), self_scores, rtol=1e-4)
    missing = runner.invoke(
        cli, ["build", "--task", task_spec, "--checkpoint", str(tmp_path / "run-*/final.pt"), "-o", str(store_path)]
    )
    assert missing.exit_code == 2 and "no checkpoint matches" in missing.output
