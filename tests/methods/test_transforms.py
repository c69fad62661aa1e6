"""The store's transforms/: atomic numpy arrays recorded in the manifest, checked on read and by verify."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradindex import CorruptStoreError, IncompleteStoreError
from gradindex.store import StoreLayout, create_store, open_store


@pytest.fixture
def store(tmp_path):
    return create_store(
        tmp_path / "s.gradindex", StoreLayout.auto(10, 4, rows_per_shard=5), {"method": {"name": "test"}}
    )


def test_round_trip_recorded_in_the_manifest(store):
    gram = np.arange(18, dtype=np.float64).reshape(2, 3, 3)
    assert store.write_transform("trak_gram", gram)
    again = open_store(store.path)
    assert (
        again.transforms()["trak_gram"]["shape"] == [2, 3, 3] and again.transforms()["trak_gram"]["dtype"] == "float64"
    )
    manifest = json.loads((store.path / "zarr.json").read_text())["attributes"]["gradindex"]
    assert manifest["transforms"]["trak_gram"]["file"] == "transforms/trak_gram.npy"
    np.testing.assert_array_equal(again.read_transform("trak_gram"), gram)
    # rewriting replaces the array and its record
    store.write_transform("trak_gram", gram * 2)
    np.testing.assert_array_equal(open_store(store.path).read_transform("trak_gram"), gram * 2)
    assert not [problem for problem in store.verify() if problem.startswith("transform")]


def test_exclusive_writes_keep_the_first(store):
    assert store.write_transform("basis", np.ones(3), exclusive=True)
    assert not open_store(store.path).write_transform("basis", np.zeros(3), exclusive=True)
    np.testing.assert_array_equal(store.read_transform("basis"), np.ones(3))


def test_damage_and_absence_are_clear_errors(store):
    with pytest.raises(IncompleteStoreError, match="no transform 'trak_gram'.*--resume"):
        store.read_transform("trak_gram")
    store.write_transform("trak_gram", np.eye(3))
    path = store.path / "transforms" / "trak_gram.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="fails its checksum"):
        open_store(store.path).read_transform("trak_gram")
    assert "transform trak_gram: transforms/trak_gram.npy fails its checksum" in open_store(store.path).verify()
    path.unlink()
    assert "transform trak_gram: transforms/trak_gram.npy is missing" in open_store(store.path).verify()
    with pytest.raises(ValueError, match="transform name 'Bad/Name'"):
        store.write_transform("Bad/Name", np.ones(1))
    with pytest.raises(ValueError, match="numeric numpy array"):
        store.write_transform("objects", np.array([object()]))


def test_shard_parts(store):
    store.write_transform_part("trak_gram", 1, np.full((2, 2), 3.0))
    store.write_transform_part("trak_gram", 0, np.eye(2))
    parts = store.read_transform_parts("trak_gram")
    assert sorted(parts) == [0, 1]
    np.testing.assert_array_equal(parts[1], np.full((2, 2), 3.0))
    with pytest.raises(ValueError, match="out of range"):
        store.write_transform_part("trak_gram", 7, np.eye(2))
