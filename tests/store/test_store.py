"""The Zarr store: round trips, layouts, ownership, checksums and fingerprint comparison."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradindex import (
    CorruptStoreError,
    IncompleteStoreError,
    NonFiniteError,
    ShardOwnershipError,
    StoreExistsError,
    StoreNotFoundError,
)
from gradindex.store import ShardEncoder, StoreLayout, create_store, fingerprint_differences, open_store, store_path
from gradindex.utils import crc32c_bytes, sha256_bytes


def _samples(start: int, stop: int) -> pa.Table:
    return pa.table(
        {
            "row": np.arange(start, stop, dtype=np.int64),
            "sample_id": [f"s{row}" for row in range(start, stop)],
            "label": np.arange(start, stop) % 3,
        }
    )


def _fill(store, features: np.ndarray, shards=None) -> None:
    for shard in range(store.n_shards) if shards is None else shards:
        start, stop = store.layout.shard_rows(shard)
        store.claim_shard(shard, owner="test")
        block = features[start:stop]
        store.write_shard(
            shard, block, (block.astype(np.float64) ** 2).sum(1).astype(np.float32), _samples(start, stop)
        )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n_samples=st.integers(1, 70),
    dim=st.integers(1, 9),
    rows_per_shard=st.integers(1, 25),
    dtype=st.sampled_from(["float16", "float32"]),
    seed=st.integers(0, 2**16),
)
def test_round_trip(tmp_path_factory, n_samples, dim, rows_per_shard, dtype, seed):
    features = np.random.default_rng(seed).standard_normal((n_samples, dim)).astype(np.float32)
    layout = StoreLayout.auto(n_samples, dim, dtype, rows_per_shard=rows_per_shard)
    path = tmp_path_factory.mktemp("rt") / "s.gradindex"
    store = create_store(path, layout, {"method": "test"})
    _fill(store, features)
    assert store.finalize()
    reopened = open_store(path)
    assert reopened.complete and reopened.verify() == []
    expected = features.astype(dtype)
    assert np.array_equal(reopened.read_features(), expected)
    assert np.array_equal(np.concatenate([block for _, block in reopened.iter_blocks()]), expected)
    _rows, scores = reopened.self_influence()
    np.testing.assert_allclose(scores, (features.astype(np.float64) ** 2).sum(1), rtol=1e-6)
    assert reopened.samples().column("sample_id").to_pylist() == [f"s{row}" for row in range(n_samples)]
    picked = np.random.default_rng(seed).integers(0, n_samples, size=5)
    np.testing.assert_array_equal(reopened.read_rows(picked), expected[picked].astype(np.float32))


def test_incomplete_store_reads_only_finished_shards(tmp_path):
    features = np.arange(40, dtype=np.float32).reshape(20, 2)
    store = create_store(tmp_path / "s.gradindex", StoreLayout.auto(20, 2, "float32", rows_per_shard=5), {})
    _fill(store, features, shards=[0, 2])
    assert not store.finalize()
    reopened = open_store(tmp_path / "s.gradindex")
    assert not reopened.complete and reopened.done_shards() == [0, 2]
    with pytest.raises(IncompleteStoreError, match=r"incomplete \(2/4 shards \(10/20 rows\).*--resume"):
        reopened.read_features()
    blocks = dict(reopened.iter_blocks(allow_incomplete=True))
    assert sorted(blocks) == [0, 10]
    assert np.array_equal(blocks[10], features[10:15])
    assert reopened.samples(allow_incomplete=True).column("row").to_pylist() == [*range(5), *range(10, 15)]


def test_a_reader_of_a_store_finalized_under_it_sees_it_complete(tmp_path):
    # a reader opened while the store was being built lists _shards/ after another process finalized it and
    # removed that folder: the reader adopts the completed manifest instead of failing with FileNotFoundError
    features = np.arange(40, dtype=np.float32).reshape(20, 2)
    writer = create_store(tmp_path / "s.gradindex", StoreLayout.auto(20, 2, "float32", rows_per_shard=5), {})
    _fill(writer, features, shards=[0, 1, 2])
    reader = open_store(tmp_path / "s.gradindex")
    assert reader.done_shards() == [0, 1, 2]
    _fill(writer, features, shards=[3])
    assert writer.finalize() and not (tmp_path / "s.gradindex" / "_shards").exists()
    assert reader.done_shards() == [0, 1, 2, 3] and reader.complete
    np.testing.assert_array_equal(reader.read_shard(3, allow_incomplete=True), features[15:20])


def test_shard_bytes_do_not_depend_on_write_order(tmp_path):
    features = np.random.default_rng(0).standard_normal((33, 4)).astype(np.float32)
    layout = StoreLayout.auto(33, 4, "float16", rows_per_shard=8)
    forward = create_store(tmp_path / "a.gradindex", layout, {})
    backward = create_store(tmp_path / "b.gradindex", layout, {})
    _fill(forward, features)
    _fill(backward, features, shards=reversed(range(layout.n_shards)))
    forward.finalize(), backward.finalize()
    for shard in range(layout.n_shards):
        for name in (f"features/c/{shard}/0", f"self_influence/c/{shard}"):
            assert (tmp_path / "a.gradindex" / name).read_bytes() == (tmp_path / "b.gradindex" / name).read_bytes()


def test_all_zero_shards_are_written_and_read_back(tmp_path):
    """A shard whose vectors are all zero (zero gradients, every row zeroed as non-finite) still gets its files; it
    once made zarr write nothing and the build stop with "touched 0 files"."""
    features = np.zeros((12, 3), dtype=np.float32)
    features[8:] = 1.5  # the last shard is not empty
    store = create_store(tmp_path / "s.gradindex", StoreLayout.auto(12, 3, "float16", rows_per_shard=4), {})
    _fill(store, features)
    assert store.finalize()
    reopened = open_store(tmp_path / "s.gradindex")
    assert reopened.verify() == [] and (tmp_path / "s.gradindex" / "features" / "c" / "0" / "0").exists()
    assert np.array_equal(reopened.read_features(), features.astype(np.float16))
    assert reopened.self_influence()[1].tolist() == [0.0] * 8 + [6.75] * 4


def test_float16_storage_casts_exactly_as_numpy():
    """Stores cast float32 to float16 through torch (faster); the bytes must be numpy's, edge cases included."""
    from gradindex.store import cast_vectors as _cast

    values = np.random.default_rng(0).standard_normal((64, 33)).astype(np.float32) * 10.0 ** np.arange(
        -9, 24, dtype=np.float32
    )[None, :].clip(max=1e4)
    values[0, :9] = [65504, 65519, 65520, 2.0**-24, 2.0**-25, 3 * 2.0**-26, -0.0, 1e-8, -6.1e-5]
    with np.errstate(over="ignore"):
        assert _cast(values, "float16").view(np.uint16).tobytes() == values.astype(np.float16).view(np.uint16).tobytes()
    assert _cast(values, "float32") is values


def test_finalizing_keeps_transforms_another_worker_recorded(tmp_path):
    """Worker B opened the store before worker A recorded a transform (kron's pca sides are written by whichever
    worker attaches first); B finishing the build must not drop A's record from the manifest."""
    features = np.random.default_rng(1).standard_normal((8, 2)).astype(np.float32)
    worker_a = create_store(tmp_path / "s.gradindex", StoreLayout.auto(8, 2, "float32", rows_per_shard=4), {})
    worker_b = open_store(tmp_path / "s.gradindex")
    assert worker_a.write_transform("kron_sides", np.arange(6, dtype=np.float32), exclusive=True)
    _fill(worker_b, features)
    assert worker_b.finalize()
    reopened = open_store(tmp_path / "s.gradindex")
    assert reopened.complete and sorted(reopened.transforms()) == ["kron_sides"]
    assert np.array_equal(reopened.read_transform("kron_sides"), np.arange(6, dtype=np.float32))
    assert reopened.verify() == []


def test_a_live_writer_owns_its_shard(tmp_path):
    store = create_store(tmp_path / "s.gradindex", StoreLayout.auto(10, 2, rows_per_shard=5), {})
    store.claim_shard(0, owner="first")
    with pytest.raises(ShardOwnershipError, match="owned by writer first.*--shard I/N"):
        store.claim_shard(0, owner="second")
    _fill(store, np.ones((10, 2), np.float32), shards=[1])
    with pytest.raises(ShardOwnershipError, match="already finished"):
        store.claim_shard(1, owner="third")


def test_a_dead_writers_claim_is_taken_over(tmp_path):
    store = create_store(tmp_path / "s.gradindex", StoreLayout.auto(10, 2, rows_per_shard=5), {})
    claim = tmp_path / "s.gradindex" / "_shards" / "000000.claim"
    import socket

    claim.write_text(json.dumps({"owner": "ghost", "host": socket.gethostname(), "pid": 2**22 + 12345}))
    store.claim_shard(0, owner="heir")
    assert json.loads(claim.read_text())["owner"] == "heir"


def test_verify_names_a_damaged_shard(tmp_path):
    store = create_store(tmp_path / "s.gradindex", StoreLayout.auto(12, 3, rows_per_shard=4), {})
    _fill(store, np.random.default_rng(1).standard_normal((12, 3)).astype(np.float32))
    store.finalize()
    target = tmp_path / "s.gradindex" / "features" / "c" / "1" / "0"
    data = bytearray(target.read_bytes())
    data[3] ^= 0xFF
    target.write_bytes(bytes(data))
    problems = open_store(tmp_path / "s.gradindex").verify()
    assert problems == ["shard 1: features/c/1/0 fails its checksum"]
    assert open_store(tmp_path / "s.gradindex").bad_shards() == [1]


def test_bad_values_are_rejected_before_writing(tmp_path):
    store = create_store(tmp_path / "s.gradindex", StoreLayout.auto(4, 2, "float16", rows_per_shard=4), {})
    store.claim_shard(0, owner="t")
    with pytest.raises(NonFiniteError, match=r"rows \[2\] have non-finite features"):
        store.write_shard(
            0, np.array([[0, 1], [1, 1], [np.nan, 0], [0, 0]], np.float32), np.zeros(4, np.float32), _samples(0, 4)
        )
    with pytest.raises(NonFiniteError, match="past float16's maximum 65504; build with dtype=float32"):
        store.write_shard(0, np.full((4, 2), 7e4, np.float32), np.zeros(4, np.float32), _samples(0, 4))
    with pytest.raises(ValueError, match=r"shape \(4, 2\)"):
        store.write_shard(0, np.zeros((3, 2), np.float32), np.zeros(4, np.float32), _samples(0, 4))
    assert not (tmp_path / "s.gradindex" / "features" / "c").exists()
    assert store.shard_record(0) is None


def test_opening_errors(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no gradindex store at"):
        open_store(tmp_path / "missing.gradindex")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreNotFoundError, match="not a gradindex store"):
        open_store(tmp_path / "plain")
    (tmp_path / "plain" / "zarr.json").write_text("{not json")
    with pytest.raises(CorruptStoreError, match="no readable gradindex manifest"):
        open_store(tmp_path / "plain")
    create_store(tmp_path / "s.gradindex", StoreLayout.auto(4, 2), {})
    with pytest.raises(StoreExistsError, match="resume=True .* or overwrite=True"):
        create_store(tmp_path / "s.gradindex", StoreLayout.auto(4, 2), {})


def test_fingerprint_differences_name_the_field():
    base = {"projection": {"kind": "sjlt", "dim": 1024, "seed": 0}, "checkpoints": [{"sha256": "a"}, {"sha256": "b"}]}
    changed = {
        "projection": {"kind": "sjlt", "dim": 4096, "seed": 0},
        "checkpoints": [{"sha256": "a"}, {"sha256": "c"}],
    }
    assert fingerprint_differences(base, changed) == ["checkpoints[1].sha256", "projection.dim"]
    assert fingerprint_differences(base, base) == []
    assert fingerprint_differences(base, {**base, "extra": 1}) == ["extra"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"n_samples": 0}, "n_samples must be a positive integer, got 0"),
        ({"dim": 0}, "dim must be a positive integer, got 0"),
        ({"dtype": "int8"}, "dtype must be one of float16, float32"),
        ({"rows_per_shard": 10, "rows_per_chunk": 3}, "multiple of"),
    ],
)
def test_layout_validation(options, message):
    with pytest.raises(ValueError, match=message):
        StoreLayout(**{"n_samples": 10, "dim": 4, **options})


def test_a_claim_from_another_host_on_a_shared_disk_expires(tmp_path):
    """On a shared file system the pid of another machine's writer cannot be looked at: its claim is taken over once it
    is older than the claim timeout, and respected before."""
    import time

    store = create_store(tmp_path / "s.gradindex", StoreLayout.auto(8, 2, rows_per_shard=4), {"model": "m"})
    claim = store.path / "_shards" / "000000.claim"  # the claim file of shard 0 (docs/store-format.md)
    for stamp, expected in ((time.time(), "owned by writer far-away"), (time.time() - 7200, None)):
        claim.write_text(json.dumps({"owner": "far-away", "host": "another-host", "pid": 1, "time": stamp}))
        store.claim_timeout = 3600.0
        if expected:
            with pytest.raises(ShardOwnershipError, match=expected):
                store.claim_shard(0, owner="here")
        else:
            store.claim_shard(0, owner="here")
            assert json.loads(claim.read_text())["owner"] == "here"


_ARRAY_NAMES = ("features", "self_influence")


@pytest.mark.parametrize(
    ("n_samples", "dim", "rows_per_shard", "rows_per_chunk", "dtype"),
    [(100, 8, 32, 8, "float16"), (97, 5, 32, 16, "float32"), (64, 3, 32, 32, "float16"), (7, 4, 32, 8, "float32")],
)
def test_encoding_by_numpy_is_zarrs_byte_for_byte(tmp_path, n_samples, dim, rows_per_shard, rows_per_chunk, dtype):
    """Shard files are encoded by numpy as their rows arrive (cast straight into the file's bytes, hashed on the way);
    every file must be the bytes zarr itself writes for the same rows, with their checksums: whole shards, a short last
    shard, a last chunk that is padded."""
    layout = StoreLayout(
        n_samples=n_samples, dim=dim, dtype=dtype, rows_per_shard=rows_per_shard, rows_per_chunk=rows_per_chunk
    )
    store = create_store(tmp_path / "s.gradindex", layout, {})
    rng = np.random.default_rng(0)
    for shard in range(store.n_shards):
        start, stop = store.layout.shard_rows(shard)
        values = rng.standard_normal((stop - start, dim)).astype(np.float32)
        expected = store._zarr_encode("features", start, values.astype(dtype))
        for remote in (False, True):  # streamed to the file's temporary name, or made in memory for one PUT
            encoder = ShardEncoder(
                stop - start,
                dim,
                dtype,
                ({"float16": "<f2", "float32": "<f4"}[dtype], rows_per_chunk, rows_per_shard // rows_per_chunk),
                path=store_path("memory://encoded/f") if remote else tmp_path / "encoded" / "f",
            )
            for block in range(0, len(values), 5):  # rows handed over in blocks, as a build does
                encoder.add(values[block : block + 5])
            sha256, crc32c = encoder.finish()
            assert (sha256, crc32c) == (sha256_bytes(expected[1]), crc32c_bytes(expected[1]))
            offsets = np.arange(stop - start)[::-3]
            np.testing.assert_array_equal(encoder.rows(offsets), values[offsets].astype(dtype))
            if not remote:
                assert [path.name for path in (tmp_path / "encoded").iterdir()] != ["f"]  # not in place before save
                encoder.save(tmp_path / "encoded" / "f")
                assert [path.name for path in (tmp_path / "encoded").iterdir()] == ["f"]
                assert (tmp_path / "encoded" / "f").read_bytes() == expected[1]
        store.claim_shard(shard, owner="t")
        store.write_shard(shard, values, values[:, 0].copy(), _samples(start, stop))
        for key, name, rows in zip(store._keys(shard), _ARRAY_NAMES, (values.astype(dtype), values[:, 0])):
            assert (store.path / key).read_bytes() == store._zarr_encode(name, start, rows)[1]


def test_array_metadata_is_what_zarr_writes(tmp_path):
    """A store writes its arrays' zarr.json without importing zarr; the bytes must be those zarr's own create_array
    writes for the same arrays (so zarr reads the store, and a damaged file is remade exactly)."""
    import zarr
    import zarr.storage

    for number, layout in enumerate(
        [
            StoreLayout(n_samples=100, dim=8, dtype="float16", rows_per_shard=32, rows_per_chunk=8),
            StoreLayout(n_samples=7, dim=3, dtype="float32", rows_per_shard=8, rows_per_chunk=4),
        ]
    ):
        store = create_store(tmp_path / f"s{number}.gradindex", layout, {})
        files: dict = {}
        memory = zarr.storage.MemoryStore(files)
        zarr.create_array(
            memory,
            name="features",
            shape=(layout.n_samples, layout.dim),
            chunks=(layout.rows_per_chunk, layout.dim),
            shards=(layout.rows_per_shard, layout.dim),
            dtype=layout.dtype,
            compressors=None,
            fill_value=0,
        )
        zarr.create_array(
            memory,
            name="self_influence",
            shape=(layout.n_samples,),
            chunks=(layout.rows_per_shard,),
            dtype="float32",
            compressors=None,
            fill_value=0,
        )
        for name in _ARRAY_NAMES:
            assert (store.path / name / "zarr.json").read_bytes() == files[f"{name}/zarr.json"].to_bytes()


def test_a_shard_encoder_refuses_rows_it_cannot_hold(tmp_path):
    layout = StoreLayout(n_samples=10, dim=3, dtype="float16", rows_per_shard=8, rows_per_chunk=4)
    store = create_store(tmp_path / "s.gradindex", layout, {})
    encoder = store.shard_encoder(0)
    encoder.add(np.zeros((6, 3), np.float32))
    with pytest.raises(ValueError, match=r"a shard of 8 rows of 3 values has 6 rows; it cannot take \[3, 3\] more"):
        encoder.add(np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="a shard of 8 rows was given only 6"):
        encoder.finish()
    store.claim_shard(1, owner="t")
    with pytest.raises(ValueError, match=r"shard 1 needs an encoder of \(2, 3\) rows, got \(8, 3\)"):
        store.write_shard(1, encoder, np.zeros(2, np.float32), _samples(8, 10))


def test_a_streamed_shard_file_is_saved_once_or_discarded_without_a_trace(tmp_path):
    """A shard's features file streamed to a temporary name: saved once (a second save is refused in one sentence and
    changes nothing), or discarded, which leaves neither the temporary file nor the final folder."""
    layout = ("<f2", 4, 2)
    rows = np.arange(24, dtype=np.float32).reshape(8, 3)
    saved = ShardEncoder(8, 3, "float16", layout, path=tmp_path / "c" / "0" / "0", near=tmp_path / "0.features")
    saved.add(rows)
    saved.save(tmp_path / "c" / "0" / "0")
    data = (tmp_path / "c" / "0" / "0").read_bytes()
    with pytest.raises(ValueError, match=r"0 is already committed or discarded$"):
        saved.save(tmp_path / "c" / "0" / "0")
    saved.discard()
    assert (tmp_path / "c" / "0" / "0").read_bytes() == data
    dropped = ShardEncoder(8, 3, "float16", layout, path=tmp_path / "c" / "1" / "0", near=tmp_path / "1.features")
    dropped.add(rows[:5])
    assert [path.name for path in tmp_path.iterdir() if ".gi-tmp-" in path.name]  # its rows on their way
    dropped.discard()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["c"]
    assert [path.name for path in (tmp_path / "c").iterdir()] == ["0"]
