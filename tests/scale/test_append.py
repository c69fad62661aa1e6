"""build --append: a grown training set added to a complete store, byte-identical to building it whole."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import gradindex
from gradindex import IncompatibleStoreError

sys.path.insert(0, str(Path(__file__).parent))  # this folder's helpers (_compare, grow_tasks)
from _compare import assert_same_store, store_files


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file of a store (indexes too), its manifest as written."""
    return {**store_files(path), "zarr.json": (path / "zarr.json").read_bytes()}


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
    gradindex.build_index(store, "IVF1,Flat", name="ivf", recall_queries=10)
    gradindex.build_index(store, "IVF1,Flat", name="disk", on_disk=True, recall_queries=10)
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
    with pytest.raises(
        IncompatibleStoreError, match=r"the training samples of shard 0 .* \(rows 0\.\.31, sample ids 0\.\.31\) differ"
    ):
        gradindex.build(f"{GROW}:other_120", mlp_checkpoints, store.path, append=True, **OPTIONS)
    with pytest.raises(ValueError, match="nothing to append"):
        gradindex.build(f"{GROW}:first_70", mlp_checkpoints, store.path, append=True, **OPTIONS)
    with pytest.raises(IncompatibleStoreError, match="projection.dim: store has 16, this call has 8"):
        gradindex.build(f"{GROW}:first_120", mlp_checkpoints, store.path, append=True, proj_dim=8, rows_per_shard=32)
    with pytest.raises(ValueError, match="append=True and overwrite=True exclude each other"):
        gradindex.build(f"{GROW}:first_120", mlp_checkpoints, store.path, append=True, overwrite=True, **OPTIONS)
    # nothing was changed by the refusals
    assert gradindex.open_store(store.path).complete and gradindex.open_store(store.path).n_samples == 70


def test_an_append_stopped_midway_leaves_the_old_store_and_continues(tmp_path, mlp_checkpoints):
    import os
    import subprocess

    store = gradindex.build(f"{GROW}:first_70", mlp_checkpoints, tmp_path / "s.gradindex", **OPTIONS)
    before = snapshot(store.path)
    queries = np.random.default_rng(1).standard_normal((3, store.dim)).astype(np.float32)
    old_answer = gradindex.search_store(store.path, queries, 5)
    code = (
        f"import gradindex; gradindex.build({GROW + ':first_120'!r}, {mlp_checkpoints!r}, {str(store.path)!r}, "
        f"append=True, proj_dim=16, rows_per_shard=32)"
    )
    env = {**os.environ, "GRADINDEX_CRASH_AT": "shard-after-record", "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 137
    # readers see the old store, complete and answering as before; the append waits under _append/
    stopped = gradindex.open_store(store.path)
    assert stopped.complete and stopped.n_samples == 70 and "appended_from" not in stopped.manifest
    assert {name: data for name, data in snapshot(store.path).items() if not name.startswith("_append/")} == before
    np.testing.assert_array_equal(gradindex.search_store(store.path, queries, 5)[1], old_answer[1])
    assert gradindex.verify(store.path) == []
    pending = stopped.pending_append()
    assert pending is not None and pending.n_samples == 120 and pending.progress() == "3/4 shards (96/120 rows)"
    staged = (store.path / "_append" / "features" / "c" / "2" / "0").stat().st_ino  # the rewritten half-full shard
    # an append run again continues it: finished shards are kept (moved into place), the result equals a whole build
    resumed = gradindex.build(f"{GROW}:first_120", mlp_checkpoints, store.path, append=True, **OPTIONS)
    assert resumed.complete and not (store.path / "_append").exists()
    assert (store.path / "features" / "c" / "2" / "0").stat().st_ino == staged
    whole = gradindex.build(f"{GROW}:first_120", mlp_checkpoints, tmp_path / "whole.gradindex", **OPTIONS)
    assert_same_store(resumed.path, whole.path, ignore={"task"})
    # run once more, the append has nothing to do and says so by returning the complete store
    again = gradindex.build(f"{GROW}:first_120", mlp_checkpoints, store.path, append=True, **OPTIONS)
    assert again.complete and again.n_samples == 120
    # the orphan sweep of a stopped append restores the old bytes exactly
    other = tmp_path / "other.gradindex"
    gradindex.build(f"{GROW}:first_70", mlp_checkpoints, other, **OPTIONS)
    other_before = snapshot(other)
    env["GRADINDEX_CRASH_AT"] = "append-before-manifest"
    code = code.replace(repr(str(store.path)), repr(str(other)))
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 137
    assert (other / "_append").exists()
    assert gradindex.open_store(other).sweep_temporaries() == 1
    assert snapshot(other) == other_before


def test_a_store_opened_before_an_append_keeps_reading_its_rows(tmp_path, mlp_checkpoints):
    """A reader holding the old manifest across the append's commit reads the rewritten files (the half-full shard,
    the arrays' metadata, samples.parquet) for its own rows, which the append left unchanged."""
    store = gradindex.build(f"{GROW}:first_70", mlp_checkpoints, tmp_path / "s.gradindex", **OPTIONS)
    held = gradindex.open_store(store.path)
    features, samples = held.read_features(), held.samples()
    gradindex.build(f"{GROW}:first_120", mlp_checkpoints, store.path, append=True, **OPTIONS)
    assert held.n_samples == 70
    np.testing.assert_array_equal(held.read_features(), features)  # the partial shard 2 is the grown file now
    assert held.samples().equals(samples)
    fresh = gradindex.open_store(store.path)
    np.testing.assert_array_equal(fresh.read_features()[:70], features)


def test_history_is_checked_before_anything_is_written(tmp_path, mlp_checkpoints, caplog):
    store = gradindex.build(f"{GROW}:first_70", mlp_checkpoints, tmp_path / "s.gradindex", **OPTIONS)
    before = snapshot(store.path)
    for factory, message in [
        ("changed_41", r"shard 1 of store .* \(rows 32\.\.63, sample ids 32\.\.63\) differ .* overwrite=True"),
        ("swapped_10_11", r"shard 0 of store .* \(rows 0\.\.31, sample ids 0\.\.31\) differ"),
        ("renamed_id_5", r"row 5 of store .* has sample id 5 but the task's training set now has 99 there"),
        ("string_ids", r"holds integer sample ids but the task's are now string \(row 0 has sample id '0'\)"),
    ]:
        with pytest.raises(IncompatibleStoreError, match=message):
            gradindex.build(f"{GROW}:{factory}", mlp_checkpoints, store.path, append=True, **OPTIONS)
        assert snapshot(store.path) == before
    # a store built before content hashes were recorded (and so before read checks and sealed records): the ids and
    # the 32-sample probe are all there is, and the append says so
    manifest = gradindex.open_store(store.path).manifest
    manifest.pop("read_check")
    for record in manifest["shards"]:
        for key in ("content_sha256", "crc32c", "record_sha256"):
            record.pop(key)
    gradindex.store.write_manifest(store.path, manifest)
    with caplog.at_level("WARNING", logger="gradindex"):
        grown = gradindex.build(f"{GROW}:first_120", mlp_checkpoints, store.path, append=True, **OPTIONS)
    assert grown.complete and "checked by their sample ids and a 32-sample probe only" in caplog.text


def test_append_at_a_url_equals_a_local_append(tmp_path, mlp_checkpoints):
    from gradindex.store import store_path

    url = f"memory://append-{tmp_path.name}/s.gradindex"
    gradindex.build(f"{GROW}:first_70", mlp_checkpoints, url, **OPTIONS)
    local = gradindex.build(f"{GROW}:first_70", mlp_checkpoints, tmp_path / "s.gradindex", **OPTIONS)
    for target in (url, local.path):
        gradindex.build(f"{GROW}:first_120", mlp_checkpoints, target, append=True, **OPTIONS)
    remote = store_path(url)
    remote_files = {str(item.relative_to(remote)): item.read_bytes() for item in remote.rglob("*") if item.is_file()}
    local_files = {
        str(item.relative_to(local.path)): item.read_bytes() for item in local.path.rglob("*") if item.is_file()
    }
    assert sorted(remote_files) == sorted(local_files)
    assert [name for name in local_files if name != "zarr.json" and local_files[name] != remote_files[name]] == []
    assert gradindex.open_store(url).complete and gradindex.verify(url) == []
    remote.fs.rm(remote.fs_path, recursive=True)


def test_an_append_by_several_workers(tmp_path, mlp_checkpoints):
    """Workers (shard=(I, N)) share one staged append; the store shows it only once the last shard is in, and a
    finalize completes an append whose last worker stopped before the swap."""
    import os
    import subprocess

    store = gradindex.build(f"{GROW}:first_70", mlp_checkpoints, tmp_path / "s.gradindex", **OPTIONS)
    gradindex.build(f"{GROW}:first_120", mlp_checkpoints, store.path, append=True, shard=(0, 2), **OPTIONS)
    assert gradindex.open_store(store.path).n_samples == 70  # shard 3 (worker 1's) is missing: nothing shows yet
    with pytest.raises(gradindex.IncompleteStoreError, match=r"the append to store .* 1 of 4 shards .* \(3\)"):
        gradindex.finalize(store.path)
    code = (
        f"import gradindex; gradindex.build({GROW + ':first_120'!r}, {mlp_checkpoints!r}, {str(store.path)!r}, "
        f"append=True, shard=(1, 2), proj_dim=16, rows_per_shard=32)"
    )
    env = {**os.environ, "GRADINDEX_CRASH_AT": "append-before-manifest", "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 137
    assert gradindex.open_store(store.path).n_samples == 70
    finished = gradindex.finalize(store.path)
    assert finished.complete and finished.n_samples == 120 and not (store.path / "_append").exists()
    whole = gradindex.build(f"{GROW}:first_120", mlp_checkpoints, tmp_path / "whole.gradindex", **OPTIONS)
    assert_same_store(store.path, whole.path, ignore={"task"})
