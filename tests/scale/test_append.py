"""build --append: a grown training set added to a complete store, byte-identical to building it whole."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import gradindex
from gradindex import IncompatibleStoreError

sys.path.insert(0, str(Path(__file__).parent))  # this folder's helpers (_compare, grow_tasks)
from _compare import assert_same_store

GROW = str(Path(__file__).with_name("grow_tasks.py"))
OPTIONS = {"proj_dim": 16, "rows_per_shard": 32}


@pytest.fixture(autouse=True)
def _calibration_within_the_first_rows(monkeypatch):
    """kron calibrates (plan and pca sides) on the first CALIBRATION_SAMPLES rows: an append is byte-identical to a
    whole build when the store already held them (any training set of 256+ samples); these sets are smaller."""
    monkeypatch.setattr("gradindex.methods._tracin.CALIBRATION_SAMPLES", 64)


def test_append_equals_a_whole_build_and_updates_indexes(tmp_path, mlp_checkpoints):
    store = gradindex.build(f"{GROW}:first_70", mlp_checkpoints, tmp_path / "s.gradindex", **OPTIONS)
    assert store.complete and store.n_samples == 70 and store.n_shards == 3  # the last shard is partial
    gradindex.build_index(store, "IVF2,Flat", name="ivf", recall_queries=10)
    gradindex.build_index(store, "IVF2,Flat", name="disk", on_disk=True, recall_queries=10)
    old_shard = (store.path / "features" / "c" / "0" / "0").read_bytes()

    grown = gradindex.build(f"{GROW}:first_120", mlp_checkpoints, store.path, append=True, **OPTIONS)
    assert grown.complete and grown.n_samples == 120 and grown.n_shards == 4
    assert (store.path / "features" / "c" / "0" / "0").read_bytes() == old_shard  # full shards are kept, not recomputed
    whole = gradindex.build(f"{GROW}:first_120", mlp_checkpoints, tmp_path / "whole.gradindex", **OPTIONS)
    assert_same_store(grown.path, whole.path, ignore={"task"})
    assert gradindex.open_store(grown.path).manifest["task"]["spec"].endswith("grow_tasks.py:first_120")
    assert gradindex.verify(grown.path) == []

    # the in-memory index got the new rows (and a fresh recall); the on-disk one is marked stale
    indexes = {meta["name"]: meta for meta in gradindex.list_indexes(grown.path)}
    assert indexes["ivf"]["ntotal"] == 120 and indexes["ivf"]["stale"] is None
    assert indexes["disk"]["stale"] and "rebuild" in indexes["disk"]["stale"]
    queries = np.random.default_rng(0).standard_normal((6, grown.dim)).astype(np.float32)
    exact = gradindex.search_store(grown.path, queries, 9)[1]
    np.testing.assert_array_equal(gradindex.search_store(grown.path, queries, 9, index="ivf", nprobe=2)[1], exact)
    assert (exact >= 70).any()  # the new rows are found
    with pytest.raises(gradindex.SearchError, match="index disk .* is stale"):
        gradindex.search_store(grown.path, queries, 3, index="disk")
    # queries with the recorded (grown) task work
    assert gradindex.query(grown.path, samples=[0, 1], k=3).num_rows == 6


def test_append_refuses_what_it_cannot_do(tmp_path, mlp_checkpoints):
    store = gradindex.build(f"{GROW}:first_70", mlp_checkpoints, tmp_path / "s.gradindex", **OPTIONS)
    with pytest.raises(IncompatibleStoreError, match="the first 70 training samples differ"):
        gradindex.build(f"{GROW}:other_120", mlp_checkpoints, store.path, append=True, **OPTIONS)
    with pytest.raises(ValueError, match="nothing to append"):
        gradindex.build(f"{GROW}:first_70", mlp_checkpoints, store.path, append=True, **OPTIONS)
    with pytest.raises(IncompatibleStoreError, match="projection.dim: store has 16, this call has 8"):
        gradindex.build(f"{GROW}:first_120", mlp_checkpoints, store.path, append=True, proj_dim=8, rows_per_shard=32)
    with pytest.raises(ValueError, match="append=True and overwrite=True exclude each other"):
        gradindex.build(f"{GROW}:first_120", mlp_checkpoints, store.path, append=True, overwrite=True, **OPTIONS)
    # nothing was changed by the refusals
    assert gradindex.open_store(store.path).complete and gradindex.open_store(store.path).n_samples == 70


def test_an_append_stopped_midway_resumes(tmp_path, mlp_checkpoints):
    import os
    import subprocess

    store = gradindex.build(f"{GROW}:first_70", mlp_checkpoints, tmp_path / "s.gradindex", **OPTIONS)
    code = (
        f"import gradindex; gradindex.build({GROW + ':first_120'!r}, {mlp_checkpoints!r}, {str(store.path)!r}, "
        f"append=True, proj_dim=16, rows_per_shard=32)"
    )
    env = {**os.environ, "GRADINDEX_CRASH_AT": "shard-after-record", "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 137
    stopped = gradindex.open_store(store.path)
    assert not stopped.complete and stopped.n_samples == 120 and stopped.manifest["appended_from"] == 70
    resumed = gradindex.build(f"{GROW}:first_120", mlp_checkpoints, store.path, append=True, **OPTIONS)
    assert resumed.complete
    whole = gradindex.build(f"{GROW}:first_120", mlp_checkpoints, tmp_path / "whole.gradindex", **OPTIONS)
    assert_same_store(resumed.path, whole.path, ignore={"task"})
