"""Influence functions and Arnoldi on L2-regularised logistic regression, against its closed form and
against actual leave-one-out retraining."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tiny_tasks
from methods import closed_form_logreg
from scipy.stats import pearsonr, spearmanr

import gradindex
from gradindex import IncompatibleStoreError
from gradindex.errors import GradIndexWarning
from gradindex.search import brute_force_topk

DAMPING = 0.001
QUERIES = [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def logreg(tmp_path_factory):
    return closed_form_logreg.make(tmp_path_factory.mktemp("logreg"), l2=0.1)


@pytest.fixture(scope="module")
def if_store(logreg, tmp_path_factory):
    path = tmp_path_factory.mktemp("if") / "if.gradindex"
    return gradindex.build(
        logreg.task,
        [logreg.checkpoint],
        path,
        method="if",
        projection="none",
        dtype="float32",
        rows_per_shard=128,
        method_options={"solver": "exact", "damping": DAMPING},
    )


def _dense_scores(store, task, queries, **options) -> np.ndarray:
    """Every training row's score for each query, ``[len(queries), N]``, through the query API."""
    table = gradindex.query(store, task, samples=queries, k=store.n_samples, **options)
    scores = np.full((len(queries), store.n_samples), np.nan)
    scores[table.column("query").to_numpy(), table.column("row").to_numpy()] = table.column("score").to_numpy()
    assert not np.isnan(scores).any()
    return scores


def _in_row_order(table, n_rows: int) -> np.ndarray:
    scores = np.empty(n_rows)
    scores[table.column("row").to_numpy()] = table.column("score").to_numpy()
    return scores


def test_exact_influence_equals_the_closed_form(logreg, if_store):
    assert if_store.fingerprint["method"] == {
        "name": "if",
        "normalize": False,
        "solver": "exact",
        "damping": DAMPING,
        "hessian": "hessian",
        "cg_max_iter": 100,
        "cg_tol": 1e-6,
        "lissa_depth": 1000,
        "lissa_scale": None,
        "lissa_repeats": 1,
        "lissa_batch_size": 64,
    }
    expected = logreg.influence(DAMPING, QUERIES)
    scores = _dense_scores(if_store, logreg.task, QUERIES)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # self-influence ∇ℓ(z)ᵀ(H + λI)^{-1}∇ℓ(z), stored at build
    self_scores = _in_row_order(gradindex.self_influence(if_store), if_store.n_samples)
    np.testing.assert_allclose(self_scores, logreg.self_influence(DAMPING), rtol=1e-4, atol=1e-6)


def test_query_time_damping_and_curvature_need_no_rebuild(logreg, if_store):
    expected = logreg.influence(0.05, QUERIES[:2])
    np.testing.assert_allclose(
        _dense_scores(if_store, logreg.task, QUERIES[:2], damping=0.05),
        expected,
        rtol=1e-4,
        atol=1e-5 * np.abs(expected).max(),
    )
    # for a linear model the Gauss-Newton matrix is the Hessian
    ggn = _dense_scores(if_store, logreg.task, QUERIES[:2], method_options={"hessian": "ggn"})
    np.testing.assert_allclose(ggn, logreg.influence(DAMPING, QUERIES[:2]), rtol=1e-4, atol=1e-5 * np.abs(ggn).max())
    # self-influence at another damping: recomputed through the task's gradients
    recomputed = _in_row_order(gradindex.self_influence(if_store, damping=0.05, task=logreg.task), if_store.n_samples)
    np.testing.assert_allclose(recomputed, logreg.self_influence(0.05), rtol=1e-4, atol=1e-6)


def test_cg_and_lissa_agree_with_the_exact_solve(logreg, if_store):
    exact = logreg.influence(DAMPING, QUERIES)
    cg = _dense_scores(if_store, logreg.task, QUERIES, solver="cg")
    lissa = _dense_scores(
        if_store,
        logreg.task,
        QUERIES,
        solver="lissa",
        method_options={"lissa_depth": 100, "lissa_repeats": 3, "lissa_batch_size": 128},
    )
    cg_pearson = [pearsonr(cg[i], exact[i])[0] for i in range(len(QUERIES))]
    lissa_pearson = [pearsonr(lissa[i], exact[i])[0] for i in range(len(QUERIES))]
    print(f"CG Pearson {np.round(cg_pearson, 5)}; LiSSA Pearson {np.round(lissa_pearson, 4)}")
    assert min(cg_pearson) >= 0.99 and min(lissa_pearson) >= 0.99
    np.testing.assert_allclose(cg, exact, rtol=1e-3, atol=1e-4 * np.abs(exact).max())


def test_lissa_warns_when_it_has_not_converged_and_names_the_knobs(logreg, if_store):
    exact = logreg.influence(DAMPING, QUERIES[:2])
    # a scale below half the largest eigenvalue (≈ 0.85 here): the recursion grows, not yet past the hard limit
    with pytest.warns(GradIndexWarning, match=r"LiSSA did not converge \(scale 0.3.*is growing: raise --lissa-scale"):
        _dense_scores(
            if_store, logreg.task, QUERIES[:2], solver="lissa", method_options={"lissa_depth": 20, "lissa_scale": 0.3}
        )
    # far too few iterations for the smallest eigenvalues: converging, not converged
    with pytest.warns(GradIndexWarning, match=r"raise --lissa-depth, or raise --damping"):
        _dense_scores(if_store, logreg.task, QUERIES[:2], solver="lissa", method_options={"lissa_depth": 5})
    # far below the scale, it blows past any sensible magnitude: an error naming the same knobs
    with pytest.raises(ValueError, match=r"LiSSA diverged \(scale 0.05.*raise --lissa-scale"):
        _dense_scores(
            if_store, logreg.task, QUERIES[:2], solver="lissa", method_options={"lissa_depth": 100, "lissa_scale": 0.05}
        )
    # a good setting: no warning, and the answer is right
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradIndexWarning)
        good = _dense_scores(
            if_store,
            logreg.task,
            QUERIES[:2],
            solver="lissa",
            method_options={"lissa_depth": 300, "lissa_batch_size": 256},
        )
    assert min(pearsonr(good[i], exact[i])[0] for i in range(2)) >= 0.99


def test_a_lissa_build_records_its_convergence_in_the_store(logreg, tmp_path):
    with pytest.warns(GradIndexWarning, match="LiSSA did not converge"):
        store = gradindex.build(
            logreg.task,
            [logreg.checkpoint],
            tmp_path / "l.gradindex",
            method="if",
            projection="none",
            rows_per_shard=256,
            method_options={"solver": "lissa", "lissa_depth": 5, "damping": DAMPING},
        )
    changes = store.read_transform("lissa_relative_change")
    assert changes.shape == (store.n_shards,) and (changes > 0.05).all()


def test_influence_predicts_leave_one_out_retraining(logreg, if_store):
    """The 40 most influential training points of a few test points, each left out and the model refitted."""
    queries = [0, 1, 2]
    predicted = _dense_scores(if_store, logreg.task, queries, damping=0.0) / logreg.n_train
    test_loss = closed_form_logreg.losses(logreg.theta, logreg.test_inputs, logreg.test_labels)
    results = []
    for position, query in enumerate(queries):
        top = np.argsort(-np.abs(predicted[position]))[:40]
        actual = []
        for row in top:
            keep = np.arange(logreg.n_train) != row
            refit = closed_form_logreg.fit(
                logreg.train_inputs[keep], logreg.train_labels[keep], logreg.l2, start=logreg.theta
            )
            loss = closed_form_logreg.losses(refit, logreg.test_inputs[[query]], logreg.test_labels[[query]])[0]
            actual.append(loss - test_loss[query])  # > 0: leaving z out raised q's loss, so z was a proponent
        results.append((pearsonr(predicted[position, top], actual)[0], spearmanr(predicted[position, top], actual)[0]))
    print("leave-one-out Pearson/Spearman per test point:", np.round(results, 4).tolist())
    assert all(pearson >= 0.9 and spearman >= 0.9 for pearson, spearman in results)


def test_asymmetric_topk_through_faiss_equals_dense_scoring(logreg, tmp_path):
    store = gradindex.build(
        logreg.task,
        [logreg.checkpoint],
        tmp_path / "p.gradindex",
        method="if",
        proj_dim=48,
        dtype="float32",
        rows_per_shard=100,
        method_options={"solver": "exact", "damping": DAMPING},
    )
    from gradindex.methods import as_method_featurizer
    from gradindex.pipeline import query_featurizer as _query_featurizer

    featurizer = as_method_featurizer(
        _query_featurizer(store, logreg.task, None, gradindex.featurize.resolve_device("cpu"))[0]
    )
    featurizer.configure_query({})
    batch = tuple(tensor[QUERIES] for tensor in logreg.task.test.tensors)
    queries = featurizer.query_vectors(batch).detach().numpy()
    rows = store.read_features().astype(np.float32)
    for opponents in (False, True):
        expected_scores, expected_rows = brute_force_topk(rows, -queries if opponents else queries, 15)
        table = gradindex.query(store, logreg.task, samples=QUERIES, k=15, opponents=opponents)
        np.testing.assert_array_equal(table.column("row").to_numpy().reshape(len(QUERIES), 15), expected_rows)
        np.testing.assert_allclose(
            table.column("score").to_numpy().reshape(len(QUERIES), 15),
            -expected_scores if opponents else expected_scores,
            rtol=1e-4,
            atol=1e-6,
        )


def test_arnoldi_with_full_rank_equals_exact_influence(logreg, tmp_path):
    p = closed_form_logreg.N_PARAMS
    store = gradindex.build(
        logreg.task,
        [logreg.checkpoint],
        tmp_path / "a.gradindex",
        method="arnoldi",
        dtype="float32",
        method_options={"rank": p, "damping": DAMPING},
    )
    assert store.dim == p and "arnoldi_eigenbasis" in store.transforms()
    expected = logreg.influence(DAMPING, QUERIES)
    np.testing.assert_allclose(
        _dense_scores(store, logreg.task, QUERIES), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max()
    )
    self_scores = _in_row_order(gradindex.self_influence(store), store.n_samples)
    np.testing.assert_allclose(self_scores, logreg.self_influence(DAMPING), rtol=1e-3, atol=1e-5)


def test_arnoldi_low_rank_is_the_truncated_eigendecomposition(logreg, tmp_path):
    rank = 6
    store = gradindex.build(
        logreg.task,
        [logreg.checkpoint],
        tmp_path / "a.gradindex",
        method="arnoldi",
        dtype="float32",
        method_options={"rank": rank, "iterations": 40},
    )
    values, vectors = np.linalg.eigh(logreg.hessian())
    top_values, top_vectors = values[::-1][:rank], vectors[:, ::-1][:, :rank]
    packed = store.read_transform("arnoldi_eigenbasis")
    np.testing.assert_allclose(packed[0], top_values, rtol=1e-5)
    # eigenvectors up to sign
    np.testing.assert_allclose(np.abs(np.sum(packed[1:] * top_vectors, axis=0)), 1.0, atol=1e-4)
    expected = (logreg.test_gradients()[QUERIES] @ top_vectors / top_values) @ (
        top_vectors.T @ logreg.train_gradients().T
    )
    np.testing.assert_allclose(
        _dense_scores(store, logreg.task, QUERIES), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max()
    )
    # a query asking for other build-time settings is refused, naming the option
    with pytest.raises(IncompatibleStoreError, match=r"rank=6; this query asks for rank=3"):
        gradindex.query(store, logreg.task, samples=[0], method_options={"rank": 3})
    with pytest.raises(IncompatibleStoreError, match="damping=0.0"):
        gradindex.query(store, logreg.task, samples=[0], damping=0.5)


def test_options_of_another_method_are_refused(logreg, if_store, tmp_path, mlp_checkpoints):
    with pytest.raises(ValueError, match="tau applies to stores built with method=gex"):
        gradindex.query(if_store, logreg.task, samples=[0], method_options={"tau": 0.1})
    with pytest.raises(ValueError, match="unknown option 'cg_tolerance'"):
        gradindex.query(if_store, logreg.task, samples=[0], method_options={"cg_tolerance": 0.1})
    tracin = gradindex.build(tiny_tasks.mlp_task(), mlp_checkpoints, tmp_path / "t.gradindex", proj_dim=8)
    with pytest.raises(ValueError, match="damping applies to stores built with method=if / arnoldi / trak"):
        gradindex.query(tracin, tiny_tasks.mlp_task(), samples=[0], damping=0.1)
    with pytest.raises(ValueError, match="rank does not apply to method=if; it belongs to method=arnoldi"):
        gradindex.build(
            logreg.task, [logreg.checkpoint], tmp_path / "x.gradindex", method="if", method_options={"rank": 3}
        )
    with pytest.raises(ValueError, match="uses one trained checkpoint"):
        gradindex.build(logreg.task, [logreg.checkpoint, logreg.checkpoint], tmp_path / "y.gradindex", method="if")
    with pytest.raises(ValueError, match="projection=sjlt proj_dim=64 does not apply to method=arnoldi"):
        gradindex.build(
            logreg.task, [logreg.checkpoint], tmp_path / "z.gradindex", method="arnoldi", projection="sjlt", proj_dim=64
        )
    with pytest.raises(ValueError, match="damping must be a non-negative number, got -1"):
        gradindex.build(
            logreg.task, [logreg.checkpoint], tmp_path / "w.gradindex", method="if", method_options={"damping": -1}
        )


def test_an_indefinite_hessian_is_refused_with_the_damping_that_fixes_it(tmp_path, mlp_checkpoints):
    """A randomly initialised MLP has negative curvature: the exact solve and CG say to raise --damping."""
    task = tiny_tasks.mlp_task(n_train=40, n_test=4)
    with pytest.raises(ValueError, match=r"not positive definite: its smallest eigenvalue is .* Raise damping above"):
        gradindex.build(
            task,
            mlp_checkpoints[:1],
            tmp_path / "e.gradindex",
            method="if",
            proj_dim=8,
            method_options={"solver": "exact", "damping": 0.0},
        )
    assert not (tmp_path / "e.gradindex" / "features" / "c").exists()  # nothing was written
    with pytest.raises(ValueError, match="conjugate gradients met a direction of non-positive curvature"):
        gradindex.build(
            task,
            mlp_checkpoints[:1],
            tmp_path / "c.gradindex",
            method="if",
            proj_dim=8,
            method_options={"solver": "cg", "damping": 0.0},
        )
    # enough damping makes it a well-posed (damped) influence
    store = gradindex.build(
        task,
        mlp_checkpoints[:1],
        tmp_path / "ok.gradindex",
        method="if",
        proj_dim=8,
        method_options={"solver": "exact", "damping": 10.0},
    )
    assert store.complete


def test_normalized_influence_is_the_cosine_of_the_two_sides(logreg, tmp_path):
    store = gradindex.build(
        logreg.task,
        [logreg.checkpoint],
        tmp_path / "n.gradindex",
        method="if",
        projection="none",
        normalize=True,
        dtype="float32",
        method_options={"solver": "exact", "damping": DAMPING},
    )
    train = logreg.train_gradients()
    transformed = np.linalg.solve(
        logreg.hessian() + DAMPING * np.eye(closed_form_logreg.N_PARAMS), logreg.test_gradients()[QUERIES].T
    ).T
    expected = (transformed / np.linalg.norm(transformed, axis=1, keepdims=True)) @ (
        train / np.linalg.norm(train, axis=1, keepdims=True)
    ).T
    # a sample the model fits to 1e-8 has a float32 gradient too cancelled (p − 1) to give a reliable direction
    reliable = np.linalg.norm(train, axis=1) > 1e-5
    assert reliable.sum() >= 0.95 * len(train)
    scores = _dense_scores(store, logreg.task, QUERIES)
    np.testing.assert_allclose(scores[:, reliable], expected[:, reliable], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(store.read_features(), axis=1), 1.0, rtol=1e-5)


def test_arnoldi_workers_share_one_eigenbasis(logreg, tmp_path, monkeypatch):
    from gradindex.methods import ArnoldiFeaturizer

    options = dict(method="arnoldi", dtype="float32", rows_per_shard=100, method_options={"rank": 8})
    path = tmp_path / "w.gradindex"
    first = gradindex.build(logreg.task, [logreg.checkpoint], path, shard=(0, 2), **options)
    assert not first.complete and "arnoldi_eigenbasis" in first.transforms()

    def recompute(self):
        raise AssertionError("the second worker must read the first one's eigenbasis, not compute its own")

    monkeypatch.setattr(ArnoldiFeaturizer, "compute_eigenbasis", recompute)
    second = gradindex.build(logreg.task, [logreg.checkpoint], path, shard=(1, 2), **options)
    assert second.complete
    # queries read it too, and a resumed build of a complete store changes nothing
    assert gradindex.query(second, logreg.task, samples=[0], k=3).num_rows == 3
    assert gradindex.build(logreg.task, [logreg.checkpoint], path, resume=True, **options).complete


def test_dense_gauss_newton_and_both_cg_operators_match_curvature_products():
    """G from per-sample output Jacobians equals G from products with the identity (an MLP with a regulariser); CG
    through
    per-iteration data passes (few right-hand sides) and through the formed matrix (many) both reach the exact solve."""
    import torch

    from gradindex.methods import CGSolver, Curvature, ExactSolver
    from gradindex.projection import ParamPlan

    base = tiny_tasks.mlp_task(n_train=50, n_test=4)
    task = gradindex.Task(
        model=tiny_tasks.mlp,
        train=base.train,
        test=base.test,
        regularization=lambda model: 0.05 * sum((p**2).sum() for p in model.parameters()),
    )
    torch.manual_seed(3)
    model = tiny_tasks.mlp()
    state = {f"model.{name}": value.detach() for name, value in model.state_dict().items()}
    names = [name for name, _ in model.named_parameters()]
    plans = ParamPlan.layout([(name, value.shape) for name, value in model.named_parameters()])
    curvature = Curvature(task, state, names, plans, kind="ggn", batch_size=16)
    p = curvature.n_params
    from_products = curvature._dense_from_products(torch.arange(p), 64)
    from_jacobians = curvature.dense()
    torch.testing.assert_close(from_jacobians, from_products, rtol=1e-5, atol=1e-6 * float(from_products.abs().max()))

    rhs = torch.randn(3, p, generator=torch.Generator().manual_seed(0))
    exact = ExactSolver(curvature).solve(rhs, 0.01)
    cg = CGSolver(curvature, max_iter=200, tol=1e-8)
    assert 1 * cg.max_iter < p <= 3 * cg.max_iter  # one row: data passes; three rows: the formed matrix
    by_passes = torch.cat([cg.solve(row[None], 0.01) for row in rhs])
    by_matrix = cg.solve(rhs, 0.01)
    for solution in (by_passes, by_matrix):
        torch.testing.assert_close(solution, exact, rtol=1e-3, atol=1e-4 * float(exact.abs().max()))
