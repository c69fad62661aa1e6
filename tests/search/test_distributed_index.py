"""Approximate search beyond one process: recall measured for proponents and opponents (each with its own nprobe),
IVF filled on Dask workers equal to the one-process build, searched over the workers, surviving a lost worker, too
few training rows refused with the numbers, and index files streamed to and from object storage."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

import gradindex
from gradindex import ArgumentError
from gradindex.cli import cli
from gradindex.search import brute_force_topk, clear_index_cache, read_index_meta, recall_at_k, search_index
from gradindex.store import RemotePath, StoreLayout, create_store

distributed = pytest.importorskip("distributed")

from gradindex.search import DaskIndexSearch, DaskSearch  # noqa: E402

K = 10


def clustered(seed: int, n_rows: int, dim: int, n_centres: int = 20) -> np.ndarray:
    """Rows around a few centres (as gradient stores are), no exact ties."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, dim)) * 2
    return (centres[rng.integers(0, n_centres, n_rows)] + rng.standard_normal((n_rows, dim))).astype(np.float32)


def synthetic_store(path, vectors: np.ndarray, rows_per_shard: int):
    n_rows, dim = vectors.shape
    layout = StoreLayout(
        n_samples=n_rows, dim=dim, dtype="float32", rows_per_shard=rows_per_shard, rows_per_chunk=rows_per_shard // 4
    )
    store = create_store(path, layout, {"test": "distributed-index"})
    for shard in range(layout.n_shards):
        start, stop = layout.shard_rows(shard)
        ids = np.arange(start, stop, dtype=np.int64)
        store.claim_shard(shard, owner="test")
        store.write_shard(
            shard, vectors[start:stop], (vectors[start:stop] ** 2).sum(1), pa.table({"row": ids, "sample_id": ids})
        )
    assert store.finalize()
    return gradindex.open_store(path)


@pytest.fixture(scope="module")
def vectors():
    return clustered(3, 4000, 16)


@pytest.fixture
def store(tmp_path, vectors):
    return synthetic_store(tmp_path / "s.gradindex", vectors, rows_per_shard=512)


def _brute_recall(vectors: np.ndarray, meta: dict, opponents: bool, found_rows: np.ndarray) -> float:
    """recall@k of ``found_rows`` (top-(k+1) of the held-out rows, self left out) against numpy float64 brute force."""
    rows = np.asarray(meta["recall_rows"])
    queries = -vectors[rows] if opponents else vectors[rows]
    _, exact = brute_force_topk(vectors, queries, K + 1)
    exact = np.stack([[r for r in row if r != own][:K] for row, own in zip(exact, rows)])
    found = np.stack([[r for r in row if r != own][:K] for row, own in zip(found_rows, rows)])
    return recall_at_k(found, exact)


def test_recall_is_measured_for_proponents_and_opponents_each_with_its_nprobe(store, vectors):
    meta = gradindex.build_index(store, "IVF,Flat", name="ivf", k=K)
    for suffix, opponents in (("", False), ("_opponents", True)):
        curve = meta[f"curve{suffix}"]
        chosen = meta[f"nprobe{suffix}"]
        assert curve[-1]["value"] == chosen and meta[f"recall{suffix}"] == curve[-1]["recall"]
        assert meta[f"recall{suffix}"] >= 0.95 and all(point["recall"] < 0.95 for point in curve[:-1])
        # the recall in the meta is what the index finds at that nprobe, against numpy brute force
        rows = np.asarray(meta["recall_rows"])
        queries = -vectors[rows] if opponents else vectors[rows]
        found = search_index(store, queries, K + 1, "ivf", nprobe=chosen)[1]
        assert _brute_recall(vectors, meta, opponents, found) == pytest.approx(meta[f"recall{suffix}"], abs=1e-4)
        # a query in that direction searches with that direction's nprobe
        default = search_index(store, vectors[:30] + 0.05, K, "ivf", opponents=opponents)
        pinned = search_index(store, vectors[:30] + 0.05, K, "ivf", opponents=opponents, nprobe=chosen)
        np.testing.assert_array_equal(default[1], pinned[1])
    listed = gradindex.list_indexes(store)[0]
    assert listed["recall_opponents"] == meta["recall_opponents"]


def test_cli_index_reports_recall_for_both_directions(store):
    built = CliRunner().invoke(cli, ["index", str(store.path), "--factory", "IVF,Flat", "--name", "ivf"])
    assert built.exit_code == 0, built.output
    meta = read_index_meta(store.path / "indexes", "ivf")
    assert "opponents nprobe=" in built.output and "proponents nprobe=" in built.output
    summary = (
        f"recall@10={meta['recall']:.3f} at nprobe={meta['nprobe']} for proponents, "
        f"{meta['recall_opponents']:.3f} at nprobe={meta['nprobe_opponents']} for opponents"
    )
    assert summary in built.output
    listed = CliRunner().invoke(cli, ["index", str(store.path), "--list"])
    assert listed.exit_code == 0 and summary in listed.output
    as_json = CliRunner().invoke(cli, ["index", str(store.path), "--list", "--format", "json"])
    assert json.loads(as_json.output)[0]["nprobe_opponents"] == meta["nprobe_opponents"]


def test_too_few_training_rows_are_refused_with_the_numbers(store):
    # 4000 rows, 200 held out: 3800 to draw from, and IVF256 needs 39 x 256 = 9984
    with pytest.raises(
        ValueError, match=r"nlist=256 .* 39 × 256 = 9,984 training rows, but the store has only 3,800 .*IVF64,"
    ):
        gradindex.build_index(store, "IVF256,Flat")
    with pytest.raises(ValueError, match=r"only 500 of its 3,800 rows were drawn .*use fewer lists \(e.g. IVF8"):
        gradindex.build_index(store, "IVF32,Flat", train_size=500)
    assert gradindex.list_indexes(store) == []


def test_lists_filled_on_dask_workers_equal_the_one_process_build(store, vectors, dask_client):
    local = gradindex.build_index(store, "IVF,SQfp16", name="local")
    spread = gradindex.build_index(store, "IVF,SQfp16", name="spread", dask=dask_client)
    on_disk = gradindex.build_index(store, "IVF,SQfp16", name="disk", dask=dask_client, on_disk=True)
    assert spread["built_on"] == "dask (2 workers)" and spread["train_rows"] == local["train_rows"]
    for key in ("recall", "nprobe", "recall_opponents", "nprobe_opponents"):
        assert [spread[key], on_disk[key]] == [local[key]] * 2, key
    for key in ("curve", "curve_opponents"):  # the same recall at every nprobe (the query rates are timings)
        recalls = [[(point["value"], point["recall"]) for point in meta[key]] for meta in (spread, on_disk, local)]
        assert recalls[0] == recalls[1] == recalls[2], key
    queries = vectors[::97] + 0.05
    with DaskIndexSearch(store, dask_client, "spread") as search:
        assert search.n_workers == 2 and all(search.parts)
        for opponents in (False, True):
            expected = search_index(store, queries, K, "local", opponents=opponents)
            for name in ("spread", "disk"):
                np.testing.assert_array_equal(
                    search_index(store, queries, K, name, opponents=opponents)[1], expected[1]
                )
            scores, rows = search.search(queries, K, opponents=opponents)
            np.testing.assert_array_equal(rows, expected[1])
            np.testing.assert_allclose(scores, expected[0], rtol=1e-5, atol=1e-5)
        # every list probed: the exact answer
        nlist = read_index_meta(store.path / "indexes", "spread")["nlist"]
        exact = brute_force_topk(vectors, queries, K)[1]
        np.testing.assert_array_equal(search.search(queries, K, nprobe=nlist)[1][:, :3], exact[:, :3])
    # an on-disk index: each worker copies its rows' entries out of the memory-mapped lists
    with DaskIndexSearch(store, dask_client, "disk") as search:
        for opponents in (False, True):
            expected = search_index(store, queries, K, "local", opponents=opponents)[1]
            np.testing.assert_array_equal(search.search(queries, K, opponents=opponents)[1], expected)
    # search_store and query take index and dask together
    found = gradindex.search_store(store, queries, K, index="spread", dask=dask_client, opponents=True)
    np.testing.assert_array_equal(found[1], search_index(store, queries, K, "local", opponents=True)[1])


def test_only_ivf_indexes_spread_over_dask(store, dask_client):
    with pytest.raises(ArgumentError, match="only IVF lists can be filled on Dask workers"):
        gradindex.build_index(store, "HNSW16", dask=dask_client)
    gradindex.build_index(store, "HNSW16", name="hnsw")
    with pytest.raises(ArgumentError, match="hnsw .* is not an IVF index: only IVF lists can be spread"):
        DaskIndexSearch(store, dask_client, "hnsw")


def _kill_holder(client, search, position: int) -> str:
    """SIGKILL the worker process holding part ``position``; wait until the scheduler has seen it go."""
    address = search.holders[position]
    pid = client.run(os.getpid)[address]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while address in client.scheduler_info()["workers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return address


def test_a_lost_worker_is_survived_and_the_answer_stays_exact(store, vectors):
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    own = distributed.Client(cluster)
    try:
        gradindex.build_index(store, "IVF,Flat", name="ivf")
        queries = vectors[::131] + 0.05
        exact = gradindex.search_store(store, queries, K)
        expected_ivf = search_index(store, queries, K, "ivf", opponents=True)
        with DaskSearch(store, own) as search, DaskIndexSearch(store, own, "ivf") as approx:
            np.testing.assert_array_equal(search.search(queries, K)[1], exact[1])
            lost = _kill_holder(own, search, 1)
            scores, rows = search.search(queries, K)  # the next query still returns the exact answer
            np.testing.assert_array_equal(rows, exact[1])
            np.testing.assert_allclose(scores, exact[0], rtol=1e-5, atol=1e-5)
            assert search.replaced == 1 and lost not in search.holders
            # the index's parts on the killed worker are placed again too
            rows = approx.search(queries, K, opponents=True)[1]
            np.testing.assert_array_equal(rows, expected_ivf[1])
            assert lost not in approx.holders
            # a worker closed (not killed) mid-session: the same
            own.retire_workers([approx.holders[0]], close_workers=True)
            np.testing.assert_array_equal(search.search(queries, K)[1], exact[1])
            np.testing.assert_array_equal(approx.search(queries, K, opponents=True)[1], expected_ivf[1])
    finally:
        own.close()
        cluster.close()


def test_index_files_stream_to_and_from_object_storage(tmp_path, vectors, monkeypatch):
    """A remote store's index files go up and come down through file objects, never read whole into memory."""
    url = f"memory://gradindex-{uuid.uuid4().hex[:8]}/s.gradindex"
    remote = synthetic_store(url, vectors, rows_per_shard=512)
    local = synthetic_store(tmp_path / "s.gradindex", vectors, rows_per_shard=512)
    read_whole = RemotePath.read_bytes

    def no_whole_index_reads(self):
        assert not self.name.endswith((".faiss", ".ivfdata")), f"{self} was read whole"
        return read_whole(self)

    monkeypatch.setattr(RemotePath, "read_bytes", no_whole_index_reads)
    monkeypatch.setenv("GRADINDEX_CACHE", str(tmp_path / "cache-1"))
    gradindex.build_index(remote, "IVF,SQfp16", name="ivf", on_disk=True)
    gradindex.build_index(local, "IVF,SQfp16", name="ivf", on_disk=True)
    queries = vectors[::211] + 0.05
    monkeypatch.setenv("GRADINDEX_CACHE", str(tmp_path / "cache-2"))  # a fresh mirror: the files come down
    clear_index_cache()
    for opponents in (False, True):
        found = search_index(url, queries, K, "ivf", opponents=opponents)
        np.testing.assert_array_equal(found[1], search_index(local, queries, K, "ivf", opponents=opponents)[1])
    assert any((tmp_path / "cache-2").rglob("ivf.*.ivfdata"))


def test_dask_build_of_a_remote_store_moves_its_parts_through_the_store(tmp_path, vectors):
    """Workers of a remote store write their parts under its indexes/ (streamed); the client merges them."""
    url = f"memory://gradindex-{uuid.uuid4().hex[:8]}/s.gradindex"
    remote = synthetic_store(url, vectors, rows_per_shard=512)
    local = synthetic_store(tmp_path / "s.gradindex", vectors, rows_per_shard=512)
    # threads, not processes: the memory:// file system is this process's
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
    threads = distributed.Client(cluster)
    try:
        spread = gradindex.build_index(remote, "IVF,Flat", name="ivf", dask=threads)
    finally:
        threads.close()
        cluster.close()
    alone = gradindex.build_index(local, "IVF,Flat", name="ivf")
    assert (spread["recall"], spread["recall_opponents"]) == (alone["recall"], alone["recall_opponents"])
    leftovers = [item.name for item in (remote.path / "indexes").iterdir() if "parts" in item.name]
    assert leftovers == []
