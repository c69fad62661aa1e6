"""K-FAC / EK-FAC preconditioning (``tracin`` with ``precondition``) against a dense computation: explicit
Kronecker products and dense Fisher blocks formed from the same projected vectors."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_tasks
import torch
from click.testing import CliRunner

import gradindex
from gradindex.checkpoints import parse_checkpoints
from gradindex.cli import cli
from gradindex.errors import ArgumentError
from gradindex.featurize import load_checkpoints
from gradindex.methods import Preconditioner, PreconditionGroup, make_featurizer, precondition_groups
from gradindex.projection import ProjectionSpec
from gradindex.task import iter_batches

WEIGHTS = (0.5, 1.5)
BUILD = dict(projection="kron", proj_dim=64, kron_sides="orthogonal", dtype="float32", progress=False, device="cpu")


def _dense_curvature(rows: np.ndarray, groups, kind: str) -> np.ndarray:
    """One checkpoint's ``[D, D]`` block-diagonal curvature of ``rows`` ``[n, D]``, formed densely: K-FAC as the
    explicit Kronecker product (S_out ⊗ S_in) / e, EK-FAC as that product's eigenbasis U_out ⊗ U_in with the
    diagonal of the empirical Fisher in it, flat groups as their empirical Fisher block (or its diagonal)."""
    n, width = rows.shape
    curvature = np.zeros((width, width))
    for group in groups:
        span = slice(group.offset, group.offset + group.dim)
        part = rows[:, span]
        fisher = part.T @ part / n  # the empirical Fisher of the group, in the row-major order of its blocks
        if group.kind == "kron":
            blocks = part.reshape(n, group.k_out, group.k_in)
            s_out = np.einsum("noi,npi->op", blocks, blocks) / n
            s_in = np.einsum("noi,noj->ij", blocks, blocks) / n
            energy = np.trace(fisher)
            if kind == "kfac":
                curvature[span, span] = np.kron(s_out, s_in) / energy
            else:
                basis = np.kron(np.linalg.eigh(s_out)[1], np.linalg.eigh(s_in)[1])
                values = np.diag(basis.T @ fisher @ basis)
                curvature[span, span] = basis @ np.diag(values) @ basis.T
        elif group.kind == "dense":
            curvature[span, span] = fisher
        else:
            curvature[span, span] = np.diag(np.diag(fisher))
    return curvature


def _dense_inverse(curvature: np.ndarray, groups, damping: float) -> np.ndarray:
    """(H + λ_g I)^{-1} block by block, λ_g = damping · the mean eigenvalue of the group's block."""
    inverse = np.zeros_like(curvature)
    for group in groups:
        span = slice(group.offset, group.offset + group.dim)
        block = curvature[span, span]
        shift = damping * np.trace(block) / group.dim
        inverse[span, span] = np.linalg.inv(block + shift * np.eye(group.dim))
    return inverse


def _dense_scores(rows: np.ndarray, queries: np.ndarray, groups, kind: str, damping: float, weights=WEIGHTS):
    """``(scores [q, n], self-influence [n])``: Σ_c η_c v_c(q)ᵀ(H_c + λ)^{-1}v_c(z) with v_c the raw projected
    gradient (the stored row's block divided by √η_c) and H_c its curvature."""
    block = sum(group.dim for group in groups)
    scores, self_scores = 0.0, 0.0
    for c, weight in enumerate(weights):
        raw = rows[:, c * block : (c + 1) * block] / np.sqrt(weight)
        raw_queries = queries[:, c * block : (c + 1) * block] / np.sqrt(weight)
        inverse = _dense_inverse(_dense_curvature(raw, groups, kind), groups, damping)
        scores = scores + weight * raw_queries @ inverse @ raw.T
        self_scores = self_scores + weight * np.einsum("ni,ij,nj->n", raw, inverse, raw)
    return scores, self_scores


GROUPS = [
    PreconditionGroup("kron", 0, 12, k_out=3, k_in=4),
    PreconditionGroup("dense", 12, 5),
    PreconditionGroup("kron", 17, 10, k_out=5, k_in=2),
    PreconditionGroup("diagonal", 27, 3),
]


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_factors_match_explicit_kronecker_products(kind):
    generator = np.random.default_rng(0)
    block = sum(group.dim for group in GROUPS)
    rows = generator.standard_normal((200, len(WEIGHTS) * block)) * generator.uniform(0.2, 3.0, len(WEIGHTS) * block)
    queries = generator.standard_normal((6, len(WEIGHTS) * block))

    def chunks():
        return (rows[start : start + 64] for start in range(0, len(rows), 64))

    preconditioner = Preconditioner.fit(chunks, GROUPS, WEIGHTS, kind)
    for c in range(len(WEIGHTS)):
        expected = _dense_curvature(rows[:, c * block : (c + 1) * block], GROUPS, kind)
        np.testing.assert_allclose(preconditioner.dense()[c].numpy(), expected, atol=1e-10)
    for damping in (0.1, 2.0):
        expected_scores, expected_self = _dense_scores(rows, queries, GROUPS, kind, damping)
        # rows as stored carry √η_c: the stored rows of raw vectors r are √η_c r
        stored = np.concatenate([rows[:, c * block : (c + 1) * block] for c in range(len(WEIGHTS))], axis=1)
        query_vectors = preconditioner.inverse(torch.from_numpy(queries), damping).numpy()
        np.testing.assert_allclose(query_vectors @ stored.T, expected_scores, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(
            preconditioner.quadratic(torch.from_numpy(rows), damping).numpy(), expected_self, rtol=1e-9
        )
    packed = preconditioner.pack()
    again = Preconditioner.unpack(packed, GROUPS, WEIGHTS)
    np.testing.assert_allclose(again.inverse(torch.from_numpy(queries), 0.3), preconditioner.inverse(queries, 0.3))
    with pytest.raises(ValueError, match="float64"):
        Preconditioner.unpack(packed[:-1], GROUPS, WEIGHTS)


def test_wide_sides_keep_their_diagonal():
    """A kron side wider than DENSE_MAX keeps the identity basis: K-FAC is then diag(s_out) ⊗ S_in / e."""
    group = PreconditionGroup("kron", 0, 8, k_out=4, k_in=2, dense_max=3)
    assert not group.side_dense("out") and group.side_dense("in")
    rows = np.random.default_rng(1).standard_normal((50, 8))
    preconditioner = Preconditioner.fit(lambda: [rows], [group], [1.0], "kfac")
    blocks = rows.reshape(50, 4, 2)
    s_out = np.diag(np.einsum("noi,noi->o", blocks, blocks) / 50)
    s_in = np.einsum("noi,noj->ij", blocks, blocks) / 50
    expected = np.kron(s_out, s_in) / (np.square(rows).sum() / 50)
    np.testing.assert_allclose(preconditioner.dense()[0].numpy(), expected, atol=1e-12)
    again = Preconditioner.unpack(preconditioner.pack(), [group], [1.0])
    np.testing.assert_allclose(again.dense()[0].numpy(), expected, atol=1e-12)


def test_singular_without_damping_names_the_fix():
    rows = np.zeros((10, 12))
    rows[:, 0] = 1.0  # rank one
    preconditioner = Preconditioner.fit(lambda: [rows], GROUPS[:1], [1.0], "ekfac")
    with pytest.raises(ArgumentError, match="damping"):
        preconditioner.inverse(torch.from_numpy(rows[:2]), 0.0)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A plain TracIn store and an EK-FAC one of the same projected vectors (two checkpoints, kron sides)."""
    directory = tmp_path_factory.mktemp("ekfac")
    task = tiny_tasks.mlp_task()
    checkpoints = tiny_tasks.save_checkpoints(tiny_tasks.mlp, directory, weights=WEIGHTS)
    plain = gradindex.build(task, checkpoints, directory / "plain.gradindex", **BUILD)
    preconditioned = {
        kind: gradindex.build(
            task,
            checkpoints,
            directory / f"{kind}.gradindex",
            method_options={"precondition": kind, "damping": 0.2},
            **BUILD,
        )
        for kind in ("kfac", "ekfac")
    }
    return task, checkpoints, plain, preconditioned


def _query_rows(task, checkpoints, store, samples) -> np.ndarray:
    """The query samples' TracIn vectors φ(q) ``[q, C·k]`` as the plain store's featurizer makes them."""
    loaded = load_checkpoints(task, parse_checkpoints(checkpoints), torch.device("cpu"))
    featurizer = make_featurizer(
        "tracin",
        task,
        loaded,
        projection=ProjectionSpec.from_dict(store.fingerprint["projection"]),
        layers=None,
        normalize=False,
        device=torch.device("cpu"),
    )
    featurizer.attach(store)
    (batch,) = iter_batches(task.test, samples, len(samples), task.collate)
    return featurizer.featurize(batch).double().numpy()


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_queries_and_self_influence_match_the_dense_formula(stores, kind):
    task, checkpoints, plain, preconditioned = stores
    store = preconditioned[kind]
    groups = precondition_groups(store.fingerprint)
    assert [group.kind for group in groups] == ["kron", "kron"]  # both layers factored, projected k_out x k_in
    assert groups[0].dim < 16 * 13
    rows = np.concatenate([np.asarray(block) for _, block in plain.iter_blocks()]).astype(np.float64)
    n_train, samples = len(rows), [0, 3, 7]
    query_rows = _query_rows(task, checkpoints, plain, samples)
    for damping in (0.2, 3.0):
        expected, expected_self = _dense_scores(rows, query_rows, groups, kind, damping)
        table = gradindex.query(store, task, samples=samples, k=n_train, progress=False, damping=damping)
        found = np.zeros((len(samples), n_train))
        found[table.column("query").to_numpy(), table.column("row").to_numpy()] = table.column("score").to_numpy()
        np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
        # the build's damping is stored; another is recomputed from the stored rows and factors
        self_table = gradindex.self_influence(store, damping=None if damping == 0.2 else damping)
        found_self = np.zeros(n_train)
        found_self[self_table.column("row").to_numpy()] = self_table.column("score").to_numpy()
        np.testing.assert_allclose(found_self, expected_self, rtol=1e-4)


def _inverse_sqrt(curvature: np.ndarray, groups, damping: float) -> np.ndarray:
    """(H + λ_g I)^{-1/2} block by block, from the eigendecomposition of each block."""
    found = np.zeros_like(curvature)
    for group in groups:
        span = slice(group.offset, group.offset + group.dim)
        block = curvature[span, span]
        values, vectors = np.linalg.eigh(block + damping * np.trace(block) / group.dim * np.eye(group.dim))
        found[span, span] = vectors @ np.diag(values**-0.5) @ vectors.T
    return found


@pytest.mark.parametrize("normalize", [False, True])
def test_both_sides_are_the_symmetric_half(stores, tmp_path, normalize):
    """precondition_side=both stores √η_c (H_c + λ)^{-1/2} v_c (unit-normalised per checkpoint with normalize: the
    TrackStar cosine); fit on every training sample, its scores and self-influence are the dense formula's."""
    task, checkpoints, plain, _ = stores
    options = {"precondition": "ekfac", "damping": 0.2, "precondition_side": "both", "factor_samples": 10_000}
    store = gradindex.build(
        task, checkpoints, tmp_path / "both.gradindex", normalize=normalize, method_options=options, **BUILD
    )
    groups = precondition_groups(store.fingerprint)
    rows = np.concatenate([np.asarray(block) for _, block in plain.iter_blocks()]).astype(np.float64)
    samples = [0, 3, 7]
    query_rows = _query_rows(task, checkpoints, plain, samples)
    block = sum(group.dim for group in groups)
    expected, expected_self = 0.0, 0.0
    for c, weight in enumerate(WEIGHTS):
        raw = rows[:, c * block : (c + 1) * block] / np.sqrt(weight)
        half = _inverse_sqrt(_dense_curvature(raw, groups, "ekfac"), groups, 0.2)
        train, test = raw @ half, query_rows[:, c * block : (c + 1) * block] / np.sqrt(weight) @ half
        if normalize:
            train /= np.linalg.norm(train, axis=1, keepdims=True)
            test /= np.linalg.norm(test, axis=1, keepdims=True)
        expected = expected + weight * test @ train.T
        expected_self = expected_self + weight * np.square(train).sum(1)
    table = gradindex.query(store, task, samples=samples, k=len(rows), progress=False)
    found = np.zeros((len(samples), len(rows)))
    found[table.column("query").to_numpy(), table.column("row").to_numpy()] = table.column("score").to_numpy()
    np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    self_table = gradindex.self_influence(store)
    found_self = np.zeros(len(rows))
    found_self[self_table.column("row").to_numpy()] = self_table.column("score").to_numpy()
    np.testing.assert_allclose(found_self, expected_self, rtol=1e-4)
    with pytest.raises(gradindex.errors.IncompatibleStoreError, match="precondition_side=query"):
        gradindex.query(store, task, samples=samples, k=3, progress=False, damping=1.0)


def test_manifest_records_it_and_info_shows_it(stores):
    _, _, plain, preconditioned = stores
    assert "precondition" not in plain.fingerprint["method"]  # plain TracIn stores are unchanged
    method = gradindex.info(preconditioned["ekfac"])["fingerprint"]["method"]
    assert method == {
        "name": "tracin",
        "normalize": False,
        "precondition": "ekfac",
        "damping": 0.2,
        "precondition_side": "query",
        "factor_samples": 4096,
    }
    result = CliRunner().invoke(cli, ["info", str(preconditioned["ekfac"].path)])
    assert result.exit_code == 0, result.output
    assert '"precondition": "ekfac"' in result.output


def test_damping_without_precondition_names_the_fix(stores, tmp_path):
    task, checkpoints, _, _ = stores
    for option in ({"damping": 0.5}, {"precondition_side": "both"}):
        with pytest.raises(
            ArgumentError, match=f"{next(iter(option))} applies to method=tracin only with precondition"
        ):
            gradindex.build(task, checkpoints, tmp_path / "x.gradindex", method_options=option, **BUILD)


def test_cli_offers_preconditioning(stores, tmp_path):
    result = CliRunner().invoke(cli, ["build", "--help"])
    assert result.exit_code == 0
    assert "--precondition [none|kfac|ekfac]" in " ".join(result.output.split())
    _, checkpoints, _, _ = stores
    output = tmp_path / "cli.gradindex"
    args = ["build", "--task", f"{tiny_tasks.TINY}:mlp_task", "-o", str(output), "--proj-dim", "64"]
    for checkpoint in checkpoints:
        args += ["--checkpoint", checkpoint]
    result = CliRunner().invoke(cli, [*args, "--precondition", "ekfac", "--damping", "0.2"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["query", str(output), "--samples", "0", "-k", "3", "--damping", "1.0"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("sides", "kinds"), [(None, {"dense"}), ("orthogonal", {"kron"})])
def test_a_cnn_over_several_shards(tmp_path, sides, kinds):
    """A CNN under the default kron plan (pca sides: its small layers projected flat, preconditioned by their dense
    block) and under orthogonal sides (convolutions factored over their positions), in a store of several shards."""
    task = tiny_tasks.cnn_task(n_train=48)
    checkpoints = tiny_tasks.save_checkpoints(tiny_tasks.cnn, tmp_path, weights=(1.0,))
    common = dict(proj_dim=40, kron_sides=sides, dtype="float32", progress=False, device="cpu", rows_per_shard=16)
    plain = gradindex.build(task, checkpoints, tmp_path / "plain.gradindex", **common)
    store = gradindex.build(
        task, checkpoints, tmp_path / "ekfac.gradindex", method_options={"precondition": "ekfac"}, **common
    )
    assert store.n_shards == 3
    groups = precondition_groups(store.fingerprint)
    assert {group.kind for group in groups} == kinds, groups
    rows = np.concatenate([np.asarray(block) for _, block in plain.iter_blocks()]).astype(np.float64)
    samples = [0, 1, 5]
    expected, expected_self = _dense_scores(
        rows, _query_rows(task, checkpoints, plain, samples), groups, "ekfac", 0.1, (1.0,)
    )
    table = gradindex.query(store, task, samples=samples, k=len(rows), progress=False)
    found = np.zeros((len(samples), len(rows)))
    found[table.column("query").to_numpy(), table.column("row").to_numpy()] = table.column("score").to_numpy()
    np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    self_table = gradindex.self_influence(store)
    found_self = np.zeros(len(rows))
    found_self[self_table.column("row").to_numpy()] = self_table.column("score").to_numpy()
    np.testing.assert_allclose(found_self, expected_self, rtol=1e-4)


@pytest.mark.parametrize("side", ["query", "both"])
def test_workers_build_the_same_store(stores, tmp_path, side):
    """Two --shard workers: the one that finishes last fits the factors (query side) or both read the first one's
    (both sides); the store equals a one-process build, and an incomplete store refuses preconditioned queries."""
    task, checkpoints, _, _ = stores
    options = dict(BUILD, rows_per_shard=32, method_options={"precondition": "ekfac", "precondition_side": side})
    single = gradindex.build(task, checkpoints, tmp_path / "one.gradindex", **options)
    path = tmp_path / "two.gradindex"
    first = gradindex.build(task, checkpoints, path, shard=(0, 2), **options)
    assert not first.complete
    if side == "query":
        with pytest.raises(gradindex.IncompleteStoreError, match="factors"):
            gradindex.query(first, task, samples=[0], allow_incomplete=True)
    second = gradindex.build(task, checkpoints, path, shard=(1, 2), **options)
    assert second.complete
    for name in ("precondition", "self_influence") if side == "query" else ("precondition",):
        np.testing.assert_allclose(second.read_transform(name), single.read_transform(name), rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(second.read_features(), single.read_features())
    with pytest.raises(gradindex.errors.IncompatibleStoreError, match="computed from every row"):
        gradindex.build(task, checkpoints, path, append=True, **options)
