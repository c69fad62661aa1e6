"""Exact search within a memory budget smaller than a shard: the store streams in pieces of shards, the answers equal
the unbounded search and numpy's, and each shard file is still checked whole (crc32c, or sha256 for stores made
before the read check) over the bytes as they are read, so damage anywhere in a file is an error, never an answer."""

from __future__ import annotations

import struct

import google_crc32c
import numpy as np
import pyarrow as pa
import pytest
from written_stores import as_made_before_read_check, written_store

import gradindex
from gradindex import CorruptStoreError, ResourceLimitError
from gradindex.search import brute_force_topk, least_memory_budget, search_store, streaming_plan
from gradindex.store import create_store, open_store

N_SAMPLES, DIM, ROWS_PER_SHARD, ROWS_PER_CHUNK = 100, 16, 32, 8  # 4 shards, the last one of 4 rows


def _features() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((N_SAMPLES, DIM)).astype(np.float32)


def _store(path, dtype: str = "float16", *, skipped: tuple[int, ...] = ()):
    return written_store(path, _features(), ROWS_PER_SHARD, ROWS_PER_CHUNK, dtype, skipped=skipped)


@pytest.fixture(params=["float16-crc32c", "float32-crc32c", "float16-sha256"])
def store(request, tmp_path):
    dtype, check = request.param.split("-")
    path = tmp_path / "s.gradindex"
    _store(path, dtype)
    if check == "sha256":
        as_made_before_read_check(path)
    return open_store(path)


QUERIES = np.random.default_rng(1).standard_normal((5, DIM)).astype(np.float32)


def _budget(store, rows: int = 12) -> int:
    """A budget whose streamed search of QUERIES (k=4) reads blocks of ``rows`` rows, a third of a shard."""
    budget = least_memory_budget(store, len(QUERIES), 4)
    while streaming_plan(store, len(QUERIES), 4, budget).block_rows < rows:
        budget += 64
    return budget


def test_pieces_of_shards_read_back_the_rows_written(store):
    pieces = list(store.iter_blocks(max_rows=7))
    assert [first for first, _ in pieces] == [0, 7, 14, 21, 28, 32, 39, 46, 53, 60, 64, 71, 78, 85, 92, 96]
    assert all(len(block) <= 7 for _, block in pieces)
    assert np.array_equal(np.concatenate([block for _, block in pieces]), store.read_features())


def test_a_budget_smaller_than_a_shard_streams_pieces_with_the_same_answers(store):
    budget = _budget(store)
    plan = streaming_plan(store, len(QUERIES), 4, budget)
    assert 1 <= plan.block_rows < ROWS_PER_SHARD and plan.depth == 1 and plan.peak_bytes <= budget
    expected = brute_force_topk(store.read_features().astype(np.float32), QUERIES, 4)
    for opponents in (False, True):
        unbounded = search_store(store, QUERIES, 4, opponents=opponents)
        streamed = search_store(store, QUERIES, 4, opponents=opponents, memory_budget=budget)
        assert np.array_equal(streamed[1], unbounded[1])
        assert np.array_equal(streamed[0], unbounded[0])
    assert np.array_equal(search_store(store, QUERIES, 4, memory_budget=budget)[1], expected[1])


def test_whole_shards_stream_when_they_fit_and_the_store_does_not(store):
    budget = streaming_plan(store, len(QUERIES), 4, 1 << 30).peak_bytes  # what whole shards, two read ahead, hold
    assert streaming_plan(store, len(QUERIES), 4, budget) == (ROWS_PER_SHARD, 2, budget)
    assert streaming_plan(store, len(QUERIES), 4, budget - 1).depth == 1
    streamed = search_store(store, QUERIES, 4, memory_budget=budget)
    assert np.array_equal(streamed[1], search_store(store, QUERIES, 4)[1])


def test_skipped_rows_stay_out_of_a_search_in_pieces(tmp_path):
    store = _store(tmp_path / "s.gradindex", skipped=(3, 40, 41, 99))
    _, unbounded = search_store(store, -QUERIES, 10)
    _, streamed = search_store(store, -QUERIES, 10, memory_budget=_budget(store))
    assert np.array_equal(streamed, unbounded)
    assert not np.isin(streamed, [3, 40, 41, 99]).any()


def test_a_budget_too_small_for_one_row_is_refused_with_the_numbers(store):
    least = least_memory_budget(store, len(QUERIES), 4)
    assert streaming_plan(store, len(QUERIES), 4, least).block_rows == 1
    search_store(store, QUERIES, 4, memory_budget=least)
    with pytest.raises(ResourceLimitError, match=rf"more than memory_budget={least - 1} .* at least {least} bytes"):
        search_store(store, QUERIES, 4, memory_budget=least - 1)


def _flip(path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["first-row", "last-row", "padding", "index", "truncate", "append", "missing"])
def test_damage_anywhere_in_a_shard_file_is_an_error_when_read_in_pieces(store, where):
    shard = 3 if where == "padding" else 1  # the last shard (4 rows) is the one whose last chunk is padded
    path = store.path / f"features/c/{shard}/0"
    data = path.read_bytes()
    row_bytes = DIM * np.dtype(store.dtype).itemsize
    if where == "first-row":
        _flip(path, 3)
    elif where == "last-row":
        _flip(path, ROWS_PER_SHARD * row_bytes - 1)
    elif where == "padding":
        _flip(path, 4 * row_bytes + 1)
    elif where == "index":
        _flip(path, len(data) - 10)
    elif where == "truncate":
        path.write_bytes(data[:-1])
    elif where == "append":
        path.write_bytes(data + b"\0")
    else:  # a chunk marked missing, the index's own crc32c made consistent: zarr would read zeros
        n_chunks = ROWS_PER_SHARD // ROWS_PER_CHUNK
        damaged = bytearray(data)
        index_start = len(data) - (16 * n_chunks + 4)
        damaged[index_start : index_start + 16] = struct.pack("<QQ", 2**64 - 1, 2**64 - 1)
        damaged[-4:] = struct.pack("<I", google_crc32c.value(bytes(damaged[index_start:-4])))
        path.write_bytes(bytes(damaged))
    reopened = open_store(store.path)
    with pytest.raises(CorruptStoreError, match=f"shard {shard}"):
        list(reopened.iter_blocks(max_rows=5))
    with pytest.raises(CorruptStoreError, match=f"shard {shard}"):
        search_store(reopened, QUERIES, 4, memory_budget=_budget(store))


def test_a_deleted_shard_file_is_named_when_read_in_pieces(store):
    (store.path / "features/c/2/0").unlink()
    with pytest.raises(CorruptStoreError, match=r"shard 2 .* is missing"):
        list(open_store(store.path).iter_blocks(max_rows=5))


def test_a_remote_store_streams_in_pieces(tmp_path):
    import uuid

    url = f"memory://gradindex-{uuid.uuid4().hex[:8]}/budget.gradindex"
    local = _store(tmp_path / "s.gradindex")
    remote = create_store(url, local.layout, {"method": "test"})
    for shard in range(local.n_shards):
        start, stop = local.layout.shard_rows(shard)
        remote.claim_shard(shard, owner="test")
        block = local.read_shard(shard)
        samples = pa.table({"row": np.arange(start, stop), "sample_id": [f"s{row}" for row in range(start, stop)]})
        remote.write_shard(shard, block, np.zeros(stop - start, np.float32), samples)
    assert remote.finalize()
    remote = gradindex.open_store(url)
    assert np.array_equal(np.concatenate([b for _, b in remote.iter_blocks(max_rows=6)]), local.read_features())
    assert np.array_equal(
        search_store(remote, QUERIES, 4, memory_budget=_budget(remote))[1], search_store(local, QUERIES, 4)[1]
    )


def test_max_rows_must_be_a_positive_integer(store):
    with pytest.raises(ValueError, match="max_rows must be a positive integer, got 0"):
        list(store.iter_blocks(max_rows=0))
