"""Dask: the store's shards spread over 2 worker processes; the merged top-k equals single-process exact search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from tiny_tasks import TINY

import gradindex
from gradindex.cli import cli
from gradindex.search import brute_force_topk
from gradindex.store import StoreLayout, create_store

pytest.importorskip("distributed")

from gradindex.search import DaskSearch, merge_topk

MLP = f"{TINY}:mlp_task"


def _store(path: Path, n_rows: int = 2000, dim: int = 16, rows_per_shard: int = 256, complete: bool = True):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n_rows, dim)).astype(np.float32)
    layout = StoreLayout(n_samples=n_rows, dim=dim, dtype="float32", rows_per_shard=rows_per_shard, rows_per_chunk=64)
    store = create_store(path, layout, {"test": "dask"})
    for shard in range(layout.n_shards):
        if not complete and shard % 3 == 1:
            continue  # leave holes: an incomplete store
        start, stop = layout.shard_rows(shard)
        ids = np.arange(start, stop, dtype=np.int64)
        store.claim_shard(shard, owner="test")
        store.write_shard(
            shard, vectors[start:stop], (vectors[start:stop] ** 2).sum(1), pa.table({"row": ids, "sample_id": ids})
        )
    store.finalize()
    return gradindex.open_store(path), vectors


def test_dask_search_equals_exact_search(dask_client, tmp_path):
    store, vectors = _store(tmp_path / "s.gradindex")
    queries = np.random.default_rng(1).standard_normal((13, 16)).astype(np.float32)
    with DaskSearch(store, dask_client) as search:
        assert search.n_workers == 2
        parts = search.parts
        assert sorted(shard for part in parts for shard in part) == list(range(store.n_shards)) and all(parts)
        for opponents in (False, True):
            scores, rows = search.search(queries, 10, opponents=opponents)
            expected_scores, expected_rows = gradindex.search_store(store, queries, 10, opponents=opponents)
            np.testing.assert_array_equal(rows, expected_rows)
            np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
        # and against numpy brute force, with k beyond one worker's rows
        scores, rows = search.search(queries, 1500)
        np.testing.assert_array_equal(rows[:, :20], brute_force_topk(vectors, queries, 20)[1])
        assert rows.shape == (13, 1500) and len(set(rows[0].tolist())) == 1500
    # workers too small to hold their shards stream them instead: same answer
    with DaskSearch(store, dask_client, memory_budget=1) as streaming:
        np.testing.assert_array_equal(streaming.search(queries, 10)[1], gradindex.search_store(store, queries, 10)[1])


def test_dask_search_of_an_incomplete_store(dask_client, tmp_path):
    store, _ = _store(tmp_path / "s.gradindex", complete=False)
    queries = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    with pytest.raises(gradindex.IncompleteStoreError, match="allow_incomplete"):
        DaskSearch(store, dask_client)
    expected = gradindex.search_store(store, queries, 7, allow_incomplete=True)
    found = gradindex.search_store(store, queries, 7, allow_incomplete=True, dask=dask_client)
    np.testing.assert_array_equal(found[1], expected[1])


def test_query_and_cli_with_a_scheduler_address(dask_client, tmp_path, mlp_checkpoints):
    store = gradindex.build(MLP, mlp_checkpoints, tmp_path / "s.gradindex", proj_dim=16, rows_per_shard=16)
    exact = gradindex.query(store, samples="0-5", k=6)
    assert gradindex.query(store, samples="0-5", k=6, dask=dask_client).column("row").equals(exact.column("row"))
    address = dask_client.scheduler.address
    result = CliRunner().invoke(
        cli, ["query", str(store.path), "--samples", "0-5", "-k", "6", "--format", "jsonl", "--dask", address]
    )
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["row"] for line in result.output.splitlines()] == exact.column("row").to_pylist()
    bad = CliRunner().invoke(cli, ["query", str(store.path), "--samples", "0", "--dask", "local:0"])
    assert bad.exit_code == 1 and "must be local:N with N a positive number of worker processes" in bad.output
    # an index and Dask together: the IVF lists spread over the workers, the same answer as the index alone
    built = CliRunner().invoke(
        cli, ["index", str(store.path), "--factory", "IVF,Flat", "--name", "ivf", "--dask", address]
    )
    assert built.exit_code == 0 and "opponents" in built.output, built.output
    alone = gradindex.query(store, samples="0-5", k=6, index="ivf", opponents=True)
    options = ["--samples", "0-5", "-k", "6", "--format", "jsonl", "--opponents", "--dask", address, "--index", "ivf"]
    both = CliRunner().invoke(cli, ["query", str(store.path), *options])
    assert both.exit_code == 0, both.output
    assert [json.loads(line)["row"] for line in both.output.splitlines()] == alone.column("row").to_pylist()


def test_merge_topk_orders_ties_by_row():
    left = (np.array([[3.0, 1.0]], np.float32), np.array([[7, 2]]))
    right = (np.array([[3.0, 2.0]], np.float32), np.array([[4, 9]]))
    scores, rows = merge_topk([left, right], 3)
    assert rows.tolist() == [[4, 7, 9]] and scores.tolist() == [[3.0, 3.0, 2.0]]
