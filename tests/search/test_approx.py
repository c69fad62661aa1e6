"""Approximate indexes: against numpy brute force, persisted atomically, measured recall, stale detection, CLI."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from tiny_tasks import TINY

import gradindex
from gradindex import IncompleteStoreError, SearchError, StoreExistsError
from gradindex.cli import cli
from gradindex.search import (
    ApproxIndex,
    OnDiskListsWriter,
    brute_force_topk,
    default_index_name,
    default_nlist,
    gpu_count,
    index_names,
    load_index,
    read_index_meta,
    recall_at_k,
    resolve_factory,
    save_index,
    write_index_meta,
)
from gradindex.store import StoreLayout, create_store

MLP = f"{TINY}:mlp_task"


def clustered(seed: int, n_rows: int, dim: int, n_centres: int = 20) -> np.ndarray:
    """Rows around a few centres (as gradient stores are), no exact ties."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, dim)) * 2
    return (centres[rng.integers(0, n_centres, n_rows)] + rng.standard_normal((n_rows, dim))).astype(np.float32)


def synthetic_store(path, vectors: np.ndarray, rows_per_shard: int, dtype: str = "float32"):
    n_rows, dim = vectors.shape
    layout = StoreLayout(
        n_samples=n_rows, dim=dim, dtype=dtype, rows_per_shard=rows_per_shard, rows_per_chunk=rows_per_shard // 4
    )
    store = create_store(path, layout, {"test": "approx"})
    for shard in range(layout.n_shards):
        start, stop = layout.shard_rows(shard)
        block = vectors[start:stop]
        ids = np.arange(start, stop, dtype=np.int64)
        store.claim_shard(shard, owner="test")
        store.write_shard(
            shard, block, (block.astype(np.float64) ** 2).sum(1), pa.table({"row": ids, "sample_id": ids})
        )
    assert store.finalize()
    return gradindex.open_store(path)


@pytest.fixture(scope="module")
def vectors():
    return clustered(0, 3000, 24)


@pytest.fixture
def store(tmp_path, vectors):
    return synthetic_store(tmp_path / "s.gradindex", vectors, rows_per_shard=512)


# ---- the faiss layer ------------------------------------------------------------------------


def test_factory_strings_and_names():
    assert default_nlist(1_000_000) == 4096
    assert resolve_factory("IVF,PQ64", 1_000_000) == "IVF4096,PQ64"
    assert resolve_factory("IVF_HNSW32,SQfp16", 1_000_000) == "IVF4096_HNSW32,SQfp16"
    assert resolve_factory("IVF1024,SQfp16", 10) == "IVF1024,SQfp16"  # an explicit count is kept
    assert resolve_factory("HNSW32", 10) == "HNSW32"
    # enough training points per list for small stores too
    assert default_nlist(3000) * 50 <= 3000
    assert default_index_name("IVF4096,SQfp16") == "ivf4096-sqfp16"
    with pytest.raises(ValueError, match="PQ's M must divide the dimension"):
        ApproxIndex.create("IVF,PQ7", 24, 3000)
    with pytest.raises(ValueError, match="index_factory string"):
        ApproxIndex.create("", 24, 3000)


def test_ivf_probing_every_list_equals_brute_force(vectors):
    queries = clustered(1, 15, 24)
    index = ApproxIndex.create("IVF16,Flat", 24, len(vectors), use_gpu=False)
    assert index.search_parameter == "nprobe" and index.parameter_values() == [1, 2, 4, 8, 16]
    with pytest.raises(SearchError, match="trained before"):
        index.add(vectors)
    index.train(vectors[:1000])
    for start in range(0, len(vectors), 700):  # block by block, rows numbered in add order
        index.add(vectors[start : start + 700])
    scores, rows = index.search(queries, 10, param=16)
    expected_scores, expected_rows = brute_force_topk(vectors, queries, 10)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-4)
    # one list probed finds fewer of the true neighbours, never more
    _, few = index.search(queries, 10, param=1)
    assert recall_at_k(few, expected_rows) < 1.0


def test_recall_at_k_counts_hits_and_misses():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert recall_at_k(exact, exact) == 1.0
    assert recall_at_k(np.array([[4, 3, 9, -1], [8, -1, -1, -1]]), exact) == pytest.approx((2 / 4 + 1 / 4) / 2)
    with pytest.raises(ValueError, match="as many"):
        recall_at_k(exact[:1], exact)


def test_save_and_load_check_the_manifest(tmp_path, vectors):
    index = ApproxIndex.create("IVF16,Flat", 24, len(vectors), use_gpu=False)
    index.train(vectors)
    index.add(vectors)
    meta = save_index(index.cpu_index(), tmp_path, "ivf", {"factory": "IVF16,Flat"})
    assert meta["ntotal"] == 3000 and meta["dim"] == 24 and meta["metric"] == "inner_product"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["ivf.json", meta["file"]])  # no temporaries left
    loaded, read_meta = load_index(tmp_path, "ivf", expect={"ntotal": 3000, "dim": 24})
    assert read_meta == meta and loaded.ntotal == 3000
    with pytest.raises(SearchError, match="built for ntotal=3000 but the store has ntotal=3500; rebuild it"):
        load_index(tmp_path, "ivf", expect={"ntotal": 3500})
    with pytest.raises(SearchError, match="no index named 'other'.*it has ivf"):
        load_index(tmp_path, "other")
    # saving again replaces the files whole and removes the old version's
    meta2 = save_index(index.cpu_index(), tmp_path, "ivf", {"factory": "IVF16,Flat"})
    assert meta2["file"] != meta["file"] and not (tmp_path / meta["file"]).exists()
    # a damaged file is a SearchError naming the fix, not a faiss traceback
    (tmp_path / meta2["file"]).write_bytes(b"not an index")
    with pytest.raises(SearchError, match="fails its checksum.*--overwrite"):
        load_index(tmp_path, "ivf")
    # a meta without its seal (written before metas were sealed) or changed after it was written is refused
    unsealed = {key: value for key, value in meta2.items() if key != "sha256"}
    (tmp_path / "ivf.json").write_text(json.dumps(unsealed))
    with pytest.raises(SearchError, match="has no seal.*drop_index.*--name ivf --overwrite"):
        load_index(tmp_path, "ivf")
    meta3 = save_index(index.cpu_index(), tmp_path, "ivf", {"factory": "IVF16,Flat"})
    sealed = json.loads((tmp_path / "ivf.json").read_text())
    (tmp_path / "ivf.json").write_text(json.dumps({**sealed, "ntotal": 5}))
    with pytest.raises(SearchError, match="fails its seal.*--overwrite"):
        load_index(tmp_path, "ivf")
    # the file disagreeing with its (sealed) meta is caught too
    (tmp_path / "ivf.json").write_text(json.dumps(sealed))
    write_index_meta(tmp_path, "ivf", {**meta3, "ntotal": 5})
    with pytest.raises(SearchError, match="file holds ntotal=3000 but its meta says 5"):
        load_index(tmp_path, "ivf")
    with pytest.raises(ValueError, match="index name"):
        save_index(index.cpu_index(), tmp_path, "../escape", {})


def test_on_disk_lists_answer_as_the_in_memory_index(tmp_path, vectors):
    queries = clustered(2, 12, 24)
    memory = ApproxIndex.create("IVF16,Flat", 24, len(vectors), use_gpu=False)
    memory.train(vectors)
    trained = faiss.clone_index(memory.cpu_index())
    memory.add(vectors)
    writer = OnDiskListsWriter(trained, tmp_path / "parts", part_bytes=24 * 4 * 500)  # several parts
    (tmp_path / "parts").mkdir()
    for start in range(0, len(vectors), 400):
        writer.add(vectors[start : start + 400])
    index = writer.finish(tmp_path / "lists.ivfdata")
    on_disk = ApproxIndex(index, "IVF16,Flat", use_gpu=False)
    for nprobe in (1, 4, 16):
        np.testing.assert_array_equal(
            on_disk.search(queries, 7, param=nprobe)[1], memory.search(queries, 7, param=nprobe)[1]
        )
    with pytest.raises(ValueError, match="needs an IVF factory"):
        OnDiskListsWriter(faiss.index_factory(24, "HNSW8", faiss.METRIC_INNER_PRODUCT), tmp_path)


@pytest.mark.skipif(gpu_count() > 0, reason="checks the CPU fallback on machines without a GPU")
def test_without_a_gpu_indexes_fall_back_to_cpu(store):
    with pytest.raises(SearchError, match="faiss sees no GPU"):
        ApproxIndex.create("IVF16,Flat", 24, 3000, use_gpu=True)
    with pytest.raises(SearchError, match="faiss sees no GPU"):
        gradindex.build_index(store, "IVF16,Flat", use_gpu=True)
    meta = gradindex.build_index(store, "IVF16,Flat")  # use_gpu=None: GPUs when there are some, else CPU
    assert meta["gpu"] is False
    _, rows = gradindex.search_store(store, clustered(3, 4, 24), 5, index=meta["name"])
    assert rows.shape == (4, 5)


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="faiss sees no GPU")
def test_ivf_on_all_gpus_equals_cpu(store):  # pragma: no cover - runs on GPU machines only
    queries = clustered(4, 20, 24)
    meta = gradindex.build_index(store, "IVF16,Flat", use_gpu=True, name="gpu")
    assert meta["gpu"] is True  # trained and filled on the GPUs
    gpu_scores, gpu_rows = gradindex.search_store(store, queries, 10, index="gpu", nprobe=16, use_gpu=True)
    ivf_scores, ivf_rows = gradindex.search_store(store, queries, 10, index="gpu", nprobe=16, use_gpu=False)
    cpu_scores, cpu_rows = gradindex.search_store(store, queries, 10, use_gpu=False)  # exact, on the CPU
    # every list probed (nprobe = nlist): the IVF search is exhaustive, so GPU, CPU-IVF and exact CPU agree
    np.testing.assert_array_equal(gpu_rows, ivf_rows)
    np.testing.assert_array_equal(gpu_rows, cpu_rows)
    np.testing.assert_allclose(gpu_scores, ivf_scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gpu_scores, cpu_scores, rtol=1e-3, atol=1e-3)


# ---- the pipeline: build_index over a store ----------------------------------------------------


@pytest.mark.parametrize("factory", ["IVF,SQfp16", "HNSW16"])
def test_build_index_measures_recall_against_brute_force(store, vectors, factory):
    meta = gradindex.build_index(store, factory, k=5, recall_queries=60, target_recall=0.9)
    assert meta["name"] == default_index_name(factory) and meta["ntotal"] == 3000 and meta["stale"] is None
    assert meta["recall_queries"] == 60 and len(meta["recall_rows"]) == 60
    # recompute the recall at the chosen nprobe/efSearch by numpy brute force, each query row left out
    held_out = np.asarray(meta["recall_rows"])
    train_rows = set(range(3000)) - set(held_out.tolist())
    assert meta["train_rows"] == 0 or meta["train_rows"] <= len(train_rows)
    queries = vectors[held_out]
    _, exact = brute_force_topk(vectors, queries, 6)
    exact = np.array([[row for row in found if row != own][:5] for found, own in zip(exact, held_out)])
    _, found = gradindex.search_store(store, queries, 6, index=meta["name"])
    found = np.array([[row for row in rows if row != own][:5] for rows, own in zip(found, held_out)])
    assert recall_at_k(found, exact) == pytest.approx(meta["recall"], abs=0.02)
    # the curve climbs to the target (or ends at the largest setting) and the default is where it got there
    curve = meta["curve"]
    assert [point["value"] for point in curve] == sorted(point["value"] for point in curve)
    assert curve[-1]["recall"] >= 0.9 or curve[-1]["value"] == max(
        ApproxIndex.create(factory, 24, 3000).parameter_values()
    )
    assert meta["nprobe"] == curve[-1]["value"] and meta["recall"] == curve[-1]["recall"]
    # shown by info
    (listed,) = gradindex.info(store)["indexes"]
    assert listed["name"] == meta["name"] and listed["recall"] == meta["recall"]


def test_build_index_adds_the_store_one_shard_at_a_time(store, monkeypatch):
    added = []
    original = ApproxIndex.add

    def spy(self, block):
        added.append(len(block))
        original(self, block)

    monkeypatch.setattr(ApproxIndex, "add", spy)
    monkeypatch.setattr(
        type(store), "read_features", lambda *a, **k: pytest.fail("the whole store was read into memory")
    )
    gradindex.build_index(store, "IVF16,Flat", recall_queries=20)
    assert sum(added) == 3000 and max(added) <= 512  # never more than one shard at a time


def test_index_answers_with_every_list_probed_equal_exact_search_and_opponents(store):
    queries = clustered(5, 9, 24)
    meta = gradindex.build_index(store, "IVF16,Flat", name="flat")
    exact_scores, exact_rows = gradindex.search_store(store, queries, 8)
    scores, rows = gradindex.search_store(store, queries, 8, index="flat", nprobe=16)
    np.testing.assert_array_equal(rows, exact_rows)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-4, atol=1e-4)
    exact_scores, exact_rows = gradindex.search_store(store, queries, 8, opponents=True)
    scores, rows = gradindex.search_store(store, queries, 8, opponents=True, index="flat", nprobe=16)
    np.testing.assert_array_equal(rows, exact_rows)
    assert (scores < 0).all()
    assert meta["nprobe"] <= 16


def test_index_errors_name_the_fix(store, tmp_path):
    gradindex.build_index(store, "IVF16,Flat", name="a", recall_queries=10)
    with pytest.raises(StoreExistsError, match="index .a. already exists.*overwrite=True"):
        gradindex.build_index(store, "IVF16,Flat", name="a")
    assert gradindex.build_index(store, "IVF16,Flat", name="a", overwrite=True, recall_queries=10)["name"] == "a"
    with pytest.raises(SearchError, match="no index named 'b'.*it has a"):
        gradindex.search_store(store, np.zeros((1, 24), np.float32), 3, index="b")
    with pytest.raises(ValueError, match="nprobe applies to a search through a persisted index; give index=NAME too"):
        gradindex.search_store(store, np.zeros((1, 24), np.float32), 3, nprobe=4)
    with pytest.raises(ValueError, match="on-disk index needs an IVF factory"):
        gradindex.build_index(store, "HNSW16", on_disk=True)
    # a store that changed since the index was built: the index is stale, and says how to rebuild
    meta = read_index_meta(store.path / "indexes", "a")
    write_index_meta(store.path / "indexes", "a", {**meta, "store": {**meta["store"], "content_sha256": "0" * 64}})
    (listed,) = gradindex.list_indexes(store)
    assert listed["stale"] == "the store changed since the index was built"
    with pytest.raises(SearchError, match="index a of .* is stale.*--overwrite"):
        gradindex.search_store(store, np.zeros((1, 24), np.float32), 3, index="a")
    gradindex.drop_index(store, "a")
    assert index_names(store.path / "indexes") == []
    # an incomplete store cannot be indexed
    layout = StoreLayout(n_samples=100, dim=24, rows_per_shard=50, rows_per_chunk=25)
    partial = create_store(tmp_path / "partial.gradindex", layout, {"test": "approx"})
    with pytest.raises(IncompleteStoreError, match="finish it with `gradindex build ... --resume` before indexing"):
        gradindex.build_index(partial, "HNSW16")


def test_on_disk_index_of_a_store(store):
    queries = clustered(6, 5, 24)
    meta = gradindex.build_index(store, "IVF16,Flat", name="disk", on_disk=True, recall_queries=30)
    assert meta["on_disk"] and meta["ivfdata"] and (store.path / "indexes" / meta["ivfdata"]).stat().st_size > 0
    _scores, rows = gradindex.search_store(store, queries, 6, index="disk", nprobe=16)
    np.testing.assert_array_equal(rows, gradindex.search_store(store, queries, 6)[1])
    leftovers = [path.name for path in (store.path / "indexes").iterdir() if "tmp" in path.name]
    assert leftovers == []


# ---- the command line ---------------------------------------------------------------------------


def test_cli_index_info_and_query_with_the_index(tmp_path, mlp_checkpoints):
    runner = CliRunner()
    store = tmp_path / "s.gradindex"
    args = ["build", "--task", MLP, "-o", str(store), "--proj-dim", "16", "--rows-per-shard", "40"]
    for checkpoint in mlp_checkpoints:
        args += ["--checkpoint", checkpoint]
    assert runner.invoke(cli, args).exit_code == 0
    made = runner.invoke(
        cli, ["index", str(store), "--factory", "IVF2,Flat", "--recall-queries", "12", "-k", "5", "--format", "json"]
    )
    assert made.exit_code == 0, made.output
    meta = json.loads(made.output)
    assert meta["name"] == "ivf2-flat" and meta["k"] == 5 and 0 <= meta["recall"] <= 1
    shown = runner.invoke(cli, ["info", str(store)])
    assert shown.exit_code == 0 and "index       ivf2-flat: IVF2,Flat (120 rows), recall@5=" in shown.output
    exact = runner.invoke(cli, ["query", str(store), "--samples", "0-3", "-k", "4", "--format", "jsonl"])
    approx = runner.invoke(
        cli,
        [
            "query",
            str(store),
            "--samples",
            "0-3",
            "-k",
            "4",
            "--format",
            "jsonl",
            "--index",
            "ivf2-flat",
            "--nprobe",
            "2",
        ],
    )
    assert approx.exit_code == 0, approx.output
    exact_rows = [json.loads(line)["row"] for line in exact.output.splitlines()]
    approx_rows = [json.loads(line)["row"] for line in approx.output.splitlines()]
    assert approx_rows == exact_rows  # every list probed: exact
    again = runner.invoke(cli, ["index", str(store), "--factory", "IVF2,Flat"])
    assert again.exit_code == 1 and "already exists in" in again.output and "pass --overwrite" in again.output
    missing = runner.invoke(cli, ["query", str(store), "--samples", "0", "--nprobe", "3"])
    assert (
        missing.exit_code == 1
        and "--nprobe applies to a search through a persisted index; give --index NAME too" in missing.output
    )
    bad = runner.invoke(cli, ["index", str(store), "--factory", "IVF,PQ1000"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output and "faiss cannot make an index" in bad.output


def test_an_in_memory_index_that_cannot_fit_is_refused_before_training(store, monkeypatch):
    """An IVF,Flat index holds 3000 x (24 floats, a list number and an id) in memory; on a machine with less available
    memory it is refused with both numbers and the fix, and nothing is written; on disk it is not held in memory."""
    monkeypatch.setattr("gradindex.utils._memory.available_memory", lambda: 100_000)
    monkeypatch.setattr("gradindex.search._persisted.available_memory", lambda: 100_000)
    with pytest.raises(
        gradindex.ResourceLimitError,
        match=r"IVF\d+,Flat of 3,000 rows needs 307.6 KiB, more than the "
        r"memory this machine has available \(97.7 KiB\); keep the IVF lists on disk \(on_disk=True\)",
    ):
        gradindex.build_index(store, "IVF16,Flat", name="big")
    assert gradindex.list_indexes(store) == []
    assert gradindex.build_index(store, "IVF16,Flat", name="disk", on_disk=True, recall_queries=20)["on_disk"]


def test_check_fits_reports_the_estimate_the_limit_and_the_fix(monkeypatch):
    from gradindex.utils import check_fits, format_bytes

    monkeypatch.setattr("gradindex.utils._memory.available_memory", lambda: 1 << 40)
    check_fits("a step", 1 << 20, 1 << 21, "its budget", "lower it")
    with pytest.raises(gradindex.ResourceLimitError, match=r"^a step needs 3.0 MiB, more than its budget \(2.0 MiB\); "
                       r"lower it$"):  # fmt: skip
        check_fits("a step", 3 << 20, 2 << 20, "its budget", "lower it")
    monkeypatch.setattr("gradindex.utils._memory.available_memory", lambda: 1 << 20)
    with pytest.raises(gradindex.ResourceLimitError, match="more than the memory this machine has available"):
        check_fits("a step", 2 << 20, 1 << 30, "its budget", "lower it")
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(12) == "12 B"
