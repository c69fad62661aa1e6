"""Guarantee 7's policy for NaN/inf vectors: ``--nonfinite error`` (the default) stops before writing the
shard and names the rows; ``skip`` and ``zero`` store zero vectors, record the rows in the manifest and
list them (build output, ``info``). A skipped row is never returned by search or self-influence; a
zeroed row takes part with score 0. Checked against numpy brute force over the store's vectors."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from reliability import harness, rel_tasks

import gradindex
from gradindex.cli import cli
from gradindex.search import brute_force_topk, least_memory_budget

NAN = f"{harness.TASKS}:nan_task"
K = 650  # more than the store holds: every row's place is checked


def _queries(dim: int) -> np.ndarray:
    return np.random.default_rng(11).standard_normal((4, dim)).astype(np.float32)


@pytest.mark.parametrize("policy", ["skip", "zero"])
def test_nonfinite_rows_are_recorded_and_searched_as_documented(env, tmp_path, policy, capsys):
    store = gradindex.build(
        NAN, env.checkpoints, tmp_path / f"{policy}.gradindex", nonfinite=policy, **harness.SMALL_OPTIONS
    )
    bad = rel_tasks.nan_rows()
    kind = "skipped" if policy == "skip" else "zeroed"
    assert store.complete and store.nonfinite_rows() == {
        "skipped": bad if policy == "skip" else [],
        "zeroed": bad if policy == "zero" else [],
    }
    assert store.manifest["nonfinite"][kind] == bad
    vectors = store.read_features().astype(np.float32)
    assert not vectors[bad].any()  # stored as zero vectors
    queries = _queries(store.dim)
    scores, rows = gradindex.search_store(store, queries, K)
    streaming = least_memory_budget(store, len(queries), K)
    _streamed_scores, streamed_rows = gradindex.search_store(store, queries, K, memory_budget=streaming)
    np.testing.assert_array_equal(rows, streamed_rows)
    keep = np.setdiff1d(np.arange(store.n_samples), bad) if policy == "skip" else np.arange(store.n_samples)
    expected_scores, expected_positions = brute_force_topk(vectors[keep], queries, K)
    np.testing.assert_array_equal(rows, keep[expected_positions])
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-4)
    if policy == "skip":
        assert not np.isin(rows, bad).any() and rows.shape[1] == store.n_samples - len(bad)
        # an approximate index holds every stored row; its answers leave the skipped ones out too
        gradindex.build_index(store, "IVF4,Flat", name="ivf", progress=False)
        _, index_rows = gradindex.search_store(store, queries, K, index="ivf", nprobe=4)
        assert not np.isin(index_rows, bad).any()
        assert (np.sort(index_rows, axis=1) == np.sort(rows, axis=1)).all()  # nprobe = every list: exact
    else:
        assert np.isin(bad, rows[0]).all() and (scores[np.isin(rows, bad)] == 0).all()
    influence = gradindex.self_influence(store)
    assert (set(bad) & set(influence.column("row").to_pylist())) == (set() if policy == "skip" else set(bad))
    assert gradindex.info(store)["nonfinite"][kind] == bad
    info = CliRunner().invoke(cli, ["info", str(store.path)])
    assert f"nonfinite   4 row(s) {kind}: 5, 37, 38, 410" in info.output
    harness.report(
        capsys,
        f"nonfinite {policy}: rows {bad} recorded as {kind}; search results checked against brute force over "
        f"{len(keep)} rows; returned skipped rows {int(np.isin(rows, bad).sum()) if policy == 'skip' else 'n/a'}",
    )


def test_error_stops_then_resume_with_skip_finishes(env, tmp_path, capsys):
    path = tmp_path / "s.gradindex"
    with pytest.raises(
        gradindex.NonFiniteError,
        match=r"vectors of shard 0 are NaN or infinite \(rows \[5, 37, 38\], sample ids \[5, 37, 38\]\)",
    ):
        gradindex.build(NAN, env.checkpoints, path, **harness.SMALL_OPTIONS)
    store = gradindex.open_store(path)
    assert (
        store.done_shards() == [] and harness.orphans(path) == []
    )  # nothing written for the shard, its claim released
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "build",
            "--task",
            NAN,
            "--checkpoint",
            env.checkpoints[0],
            "-o",
            str(path),
            "--resume",
            "--nonfinite",
            "skip",
            "--projection",
            "none",
            "--rows-per-shard",
            "100",
            "--batch-size",
            "100",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "4 row(s) had NaN/inf vectors and were skipped (zero vectors, listed in the manifest): 5, 37, 38, 410"
        in result.output
    )
    # the same bytes as a build that skipped from the start
    direct = gradindex.build(
        NAN, env.checkpoints, tmp_path / "direct.gradindex", nonfinite="skip", **harness.SMALL_OPTIONS
    )
    assert harness.diff_names(harness.snapshot(path), harness.snapshot(direct.path)) == []
    harness.report(
        capsys,
        "nonfinite error, then --resume --nonfinite skip: stopped at shard 0 with nothing written 1/1, "
        "resumed 1/1, byte mismatches vs a skip build 0",
    )


def test_float16_overflow_names_float32(env, tmp_path, capsys):
    with pytest.raises(gradindex.NonFiniteError, match="past float16's maximum 65504; build with dtype=float32"):
        gradindex.build(
            f"{harness.TASKS}:huge_task", env.checkpoints, tmp_path / "h.gradindex", **harness.SMALL_OPTIONS
        )
    store = gradindex.build(
        f"{harness.TASKS}:huge_task",
        env.checkpoints,
        tmp_path / "h32.gradindex",
        dtype="float32",
        **harness.SMALL_OPTIONS,
    )
    assert store.complete and store.nonfinite_rows() == {"skipped": [], "zeroed": []}
    harness.report(capsys, "float16 overflow (row 450): refused naming --dtype float32 1/1; float32 build complete 1/1")
