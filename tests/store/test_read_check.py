"""Reads check each shard file's crc32c (the manifest's ``read_check``), verify the sha256: a store of either kind reads
back the same values, and damage of every kind is an error on read, never values -- also damage zarr alone would
read silently (a chunk marked missing in a shard's index comes back as zeros). A store made before ``read_check``
(no crc32c in its records) is read through the sha256 as before."""

from __future__ import annotations

import json
import struct

import google_crc32c
import numpy as np
import pyarrow as pa
import pytest
import zarr
from written_stores import as_made_before_read_check, written_store

import gradindex
from gradindex import CorruptStoreError
from gradindex.search import brute_force_topk
from gradindex.store import StoreLayout, create_store, open_store, write_manifest
from gradindex.utils import crc32c_bytes, is_crc32c, sha256_bytes

N_SAMPLES, DIM, ROWS_PER_SHARD, ROWS_PER_CHUNK = 40, 6, 16, 8


def _features() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((N_SAMPLES, DIM)).astype(np.float32)


def _store(path, *, finalize: bool = True):
    return written_store(path, _features(), ROWS_PER_SHARD, ROWS_PER_CHUNK, finalize=finalize)


@pytest.fixture(params=["crc32c", "sha256"])
def store(request, tmp_path):
    path = tmp_path / "s.gradindex"
    _store(path)
    if request.param == "sha256":
        as_made_before_read_check(path)
    return open_store(path)


def test_new_stores_record_a_crc32c_and_a_seal_per_shard(tmp_path):
    store = _store(tmp_path / "s.gradindex")
    assert store.manifest["read_check"] == "crc32c"
    for shard, record in enumerate(store.manifest["shards"]):
        features = tmp_path / "s.gradindex" / f"features/c/{shard}/0"
        key, data = f"features/c/{shard}/0", features.read_bytes()
        assert record["crc32c"][key] == f"{google_crc32c.extend(google_crc32c.value(data[-4:]), data):08x}"
        assert record["files"][key] == sha256_bytes(data)
        assert len(record["record_sha256"]) == 64


def test_both_kinds_read_the_values_written_and_verify(store):
    expected = _features().astype(np.float16)
    assert np.array_equal(store.read_features(), expected)
    assert np.array_equal(store.read_rows([0, 17, 39]), expected[[0, 17, 39]].astype(np.float32))
    rows, scores = store.self_influence()
    assert np.array_equal(rows, np.arange(N_SAMPLES))
    assert np.allclose(scores, (_features().astype(np.float64) ** 2).sum(1), rtol=1e-6)
    assert store.verify() == []
    queries = np.random.default_rng(1).standard_normal((3, DIM)).astype(np.float32)
    _, rows = gradindex.search_store(store, queries, 4)
    assert np.array_equal(rows, brute_force_topk(expected.astype(np.float32), queries, 4)[1])


def _flip(path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["bit-flip", "truncate", "zero-fill", "delete", "empty"])
def test_damage_to_a_shard_file_is_an_error_on_read(store, damage):
    path = store.path / "features/c/1/0"
    data = path.read_bytes()
    if damage == "bit-flip":
        _flip(path, 3)
    elif damage == "truncate":
        path.write_bytes(data[:-1])
    elif damage == "zero-fill":
        path.write_bytes(bytes(len(data)))
    elif damage == "delete":
        path.unlink()
    else:
        path.write_bytes(b"")
    reopened = open_store(store.path)
    with pytest.raises(CorruptStoreError, match="shard 1" if damage != "empty" else "shard 1|holds 0 bytes"):
        reopened.read_features()
    assert np.array_equal(reopened.read_shard(0), _features()[:ROWS_PER_SHARD].astype(np.float16))
    assert [problem for problem in reopened.verify() if "features/c/1/0" in problem]


def test_a_chunk_marked_missing_in_its_shard_index_is_an_error_though_zarr_reads_zeros(store):
    """zarr reads a chunk its shard index marks empty as the fill value, without a word; the shard's checksum
    refuses the file."""
    path = store.path / "features/c/1/0"
    data = bytearray(path.read_bytes())
    n_chunks = ROWS_PER_SHARD // ROWS_PER_CHUNK
    index_start = len(data) - (16 * n_chunks + 4)
    data[index_start : index_start + 16] = struct.pack("<QQ", 2**64 - 1, 2**64 - 1)  # chunk 0: "not written"
    index = bytes(data[index_start : index_start + 16 * n_chunks])
    data[-4:] = struct.pack("<I", google_crc32c.value(index))  # the index's own crc32c, made consistent
    path.write_bytes(bytes(data))
    raw = zarr.open_array(str(store.path), path="features", mode="r")[ROWS_PER_SHARD : ROWS_PER_SHARD + ROWS_PER_CHUNK]
    assert not raw.any()  # zarr alone: zeros, no error
    with pytest.raises(CorruptStoreError, match="shard 1 .* fails its checksum"):
        open_store(store.path).read_shard(1)


def test_reads_check_the_crc32c_and_verify_the_sha256(tmp_path):
    """A record whose sha256 no longer matches (its crc32c does) reads fine and fails verify: the read path does not
    hash with sha256."""
    path = tmp_path / "s.gradindex"
    store = _store(path)
    manifest = dict(store.manifest)
    record = dict(manifest["shards"][1])
    record["files"] = {**record["files"], "features/c/1/0": "0" * 64}
    record.pop("record_sha256")
    record["record_sha256"] = sha256_bytes(json.dumps(record, sort_keys=True, default=str).encode())
    manifest["shards"] = [*manifest["shards"][:1], record, *manifest["shards"][2:]]
    write_manifest(path, manifest)
    reopened = open_store(path)
    assert np.array_equal(reopened.read_features(), _features().astype(np.float16))
    assert reopened.verify() == ["shard 1: features/c/1/0 fails its checksum"]


def test_a_damaged_record_of_a_store_being_built_is_refused(tmp_path):
    """Records of a store being built live in their own files: their seal catches damage to fields no read checks
    (the content hash a resume compares)."""
    path = tmp_path / "s.gradindex"
    _store(path, finalize=False)
    record_path = path / "_shards" / "000001.json"
    record = json.loads(record_path.read_text())
    record["samples_sha256"] = "0" * 64 if record["samples_sha256"][0] != "0" else "1" * 64
    record_path.write_text(json.dumps(record))
    with pytest.raises(CorruptStoreError, match="record of shard 1 .* is damaged"):
        open_store(path).shard_record(1)
    assert "shard 1: its record is damaged" in open_store(path).verify()


def test_a_store_with_a_read_check_needs_the_crc32c_in_every_record(tmp_path):
    path = tmp_path / "s.gradindex"
    store = _store(path)
    manifest = dict(store.manifest)
    first = {key: value for key, value in manifest["shards"][0].items() if key != "crc32c"}
    manifest["shards"] = [first, *manifest["shards"][1:]]
    write_manifest(path, manifest)
    with pytest.raises(CorruptStoreError, match="record of shard 0 .* is damaged"):
        open_store(path).read_shard(0)


def test_the_read_check_sees_what_a_plain_crc32c_of_the_file_cannot():
    """A part that ends with its own crc32c (a shard index), changed and made consistent: the crc32c of the whole
    file stays the same (a CRC of a message and its CRC is a constant); the read check, led by the last four bytes,
    changes."""
    body = bytes(range(200))
    index, changed = bytes(32), bytes(31) + b"\x01"
    before = body + index + struct.pack("<I", google_crc32c.value(index))
    after = body + changed + struct.pack("<I", google_crc32c.value(changed))
    assert google_crc32c.value(before) == google_crc32c.value(after)
    assert crc32c_bytes(before) != crc32c_bytes(after)
    assert is_crc32c(crc32c_bytes(before)) and crc32c_bytes(b"") == "00000000"
    assert crc32c_bytes(bytearray(before)) == crc32c_bytes(before)


@pytest.mark.parametrize(
    ("n_samples", "dim", "rows_per_shard", "rows_per_chunk", "dtype"),
    [(40, 6, 16, 8, "float16"), (33, 5, 12, 4, "float32"), (7, 3, 7, 7, "float16"), (50, 2, 8, 1, "float32")],
)
@pytest.mark.parametrize("numpy_reads", [True, False])
def test_reads_equal_zarrs_own_for_every_layout(tmp_path, monkeypatch, n_samples, dim, rows_per_shard, rows_per_chunk,
                                                 dtype, numpy_reads):  # fmt: skip
    """Shard files of the layout gradindex writes are read by numpy, anything else by zarr: both give zarr's values."""
    if not numpy_reads:
        monkeypatch.setattr("gradindex.store._store._plain_layout", lambda name, metadata: None)
    layout = StoreLayout(
        n_samples=n_samples, dim=dim, dtype=dtype, rows_per_shard=rows_per_shard, rows_per_chunk=rows_per_chunk
    )
    path = tmp_path / "s.gradindex"
    store = create_store(path, layout, {"method": "test"})
    features = np.random.default_rng(n_samples).standard_normal((n_samples, dim)).astype(np.float32)
    for shard in range(store.n_shards):
        start, stop = layout.shard_rows(shard)
        store.claim_shard(shard, owner="test")
        samples = pa.table({"row": np.arange(start, stop), "sample_id": np.arange(start, stop)})
        store.write_shard(shard, features[start:stop], np.arange(start, stop, dtype=np.float32), samples)
    assert store.finalize()
    store = open_store(path)
    read = store.read_features()
    assert read.flags.writeable and read.dtype == np.dtype(dtype)
    assert np.array_equal(read, zarr.open_array(str(path), path="features", mode="r")[:])
    assert np.array_equal(store.self_influence()[1], zarr.open_array(str(path), path="self_influence", mode="r")[:])
    assert np.array_equal(store.read_shard(store.n_shards - 1), read[layout.shard_rows(store.n_shards - 1)[0] :])
