"""Guarantee 3: a build killed at any moment (SIGKILL, or stopped at a named crash point) loses at most
the shards in flight, reopens, and ``--resume`` finishes it byte-identical to an uninterrupted build,
leaving no temporary file behind."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from reliability import harness

import gradindex
from gradindex.cli import cli
from gradindex.search import brute_force_topk

RANDOM_KILLS = 6


def test_kill_sweep(env, capsys):
    result = harness.kill_sweep(
        env.fresh("kill"),
        harness.BIG,
        env.checkpoints,
        harness.BIG_OPTIONS,
        env.big_bytes,
        n_random=RANDOM_KILLS,
        sites=harness.BUILD_SITES,
        seed=20240611,
        rows_per_shard=harness.BIG_OPTIONS["rows_per_shard"],
    )
    figures = result["figures"]
    harness.report(
        capsys,
        harness.summary(
            f"kill sweep ({RANDOM_KILLS} random SIGKILLs + {len(harness.BUILD_SITES)} crash points, 20k rows)",
            figures,
            ["tried", "killed", "resumed", "rows lost", "mismatches", "orphans"],
        ),
    )
    assert result["failures"] == []
    assert figures["tried"] == figures["resumed"] == RANDOM_KILLS + len(harness.BUILD_SITES)
    assert figures.get("rows lost", 0) == figures.get("mismatches", 0) == figures.get("orphans", 0) == 0


def test_a_stopped_build_opens_as_incomplete_and_says_how_far_it_got(env, tmp_path, capsys):
    """Guarantee 2: only the manifest, written last, says complete; a reader of a stopped build is told
    how far it got, and a query fails unless it asks for the finished part."""
    path = tmp_path / "stopped.gradindex"
    code, _ = harness.run_child(
        harness.child_build, harness.BIG, env.checkpoints, str(path), harness.BIG_OPTIONS, "finalize-before-manifest"
    )
    assert code == 137  # every shard and samples.parquet written; the manifest not yet
    store = gradindex.open_store(path)
    assert not store.complete and store.progress() == "20/20 shards (20000/20000 rows)"
    queries = store.read_rows([0, 1], allow_incomplete=True)
    with pytest.raises(
        gradindex.IncompleteStoreError,
        match=r"incomplete \(20/20 shards \(20000/20000 rows\) written\).*--resume.*--allow-incomplete",
    ):
        gradindex.search_store(store, queries, 3)
    _scores, rows = gradindex.search_store(store, queries, 3, allow_incomplete=True)
    np.testing.assert_array_equal(
        rows, brute_force_topk(store.read_features(allow_incomplete=True).astype(np.float32), queries, 3)[1]
    )
    info = CliRunner().invoke(cli, ["info", str(path)])
    assert "state       building — 20/20 shards (20000/20000 rows)" in info.output
    query = CliRunner().invoke(cli, ["self-influence", str(path), "--top", "1"])
    assert query.exit_code == 1 and "--allow-incomplete" in query.output
    harness.report(
        capsys,
        "stopped before the manifest: opens as incomplete 1/1 (20/20 shards), queries refused 2/2, "
        "--allow-incomplete answers equal brute force 1/1",
    )
