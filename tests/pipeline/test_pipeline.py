"""build -> store -> query, end to end, against trusted slow paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_tasks
import torch
from tiny_tasks import TINY

import gradindex
from gradindex import CheckpointError, IncompatibleStoreError, IncompleteStoreError, StoreExistsError
from gradindex.search import brute_force_topk, least_memory_budget

MLP = f"{TINY}:mlp_task"


def _exact_vectors(task, checkpoints, split):
    """φ by a loop of backward() calls, for the trusted reference scores."""
    from featurize.test_tracin import _loop_reference

    from gradindex.checkpoints import parse_checkpoints

    dataset = task.split(split)
    specs = parse_checkpoints(checkpoints)
    shadow = gradindex.Task(model=task.model, train=dataset)
    return _loop_reference(shadow, specs, range(len(dataset))).numpy()


def test_query_scores_equal_exact_tracin(tmp_path, mlp_checkpoints):
    store = gradindex.build(
        MLP, mlp_checkpoints, tmp_path / "s.gradindex", projection="none", dtype="float32", rows_per_shard=32
    )
    assert store.complete and store.n_shards == 4
    table = gradindex.query(store, split="test", samples=[0, 3, 5], k=7)
    assert table.column_names == ["query", "query_id", "rank", "row", "sample_id", "score"]
    task = tiny_tasks.mlp_task()
    train = _exact_vectors(task, mlp_checkpoints, "train")
    test = _exact_vectors(task, mlp_checkpoints, "test")
    expected_scores, expected_rows = brute_force_topk(train, test[[0, 3, 5]], 7)
    np.testing.assert_array_equal(table.column("row").to_numpy().reshape(3, 7), expected_rows)
    np.testing.assert_allclose(table.column("score").to_numpy().reshape(3, 7), expected_scores, rtol=1e-4, atol=1e-6)
    assert table.column("query_id").to_pylist()[::7] == [0, 3, 5]
    assert table.column("rank").to_pylist()[:7] == list(range(1, 8))
    # sample ids default to the row number
    assert table.column("sample_id").to_pylist() == table.column("row").to_pylist()
    # self-influence is |φ|², highest first
    ranking = gradindex.self_influence(store)
    np.testing.assert_allclose(
        ranking.column("score").to_numpy(), np.sort((train.astype(np.float64) ** 2).sum(1))[::-1], rtol=1e-4
    )
    assert ranking.column("rank").to_pylist() == list(range(1, len(train) + 1))


def test_faiss_topk_equals_numpy_on_the_store(tmp_path, mlp_checkpoints):
    store = gradindex.build(MLP, mlp_checkpoints, tmp_path / "s.gradindex", proj_dim=64, rows_per_shard=50)
    vectors = store.read_features().astype(np.float32)
    queries = np.random.default_rng(0).standard_normal((9, store.dim)).astype(np.float32)
    scores, rows = gradindex.search_store(store, queries, 10)
    expected_scores, expected_rows = brute_force_topk(vectors, queries, 10)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-5)


def test_streamed_search_equals_in_memory(tmp_path, mlp_checkpoints):
    store = gradindex.build(MLP, mlp_checkpoints, tmp_path / "s.gradindex", proj_dim=64, rows_per_shard=16)
    in_memory = gradindex.query(store, samples="0-9", k=12)
    streamed = gradindex.query(store, samples="0-9", k=12, memory_budget=least_memory_budget(store, 10, 12))
    assert streamed.equals(in_memory)
    opponents_memory = gradindex.query(store, samples="0-9", k=12, opponents=True)
    opponents_streamed = gradindex.query(
        store, samples="0-9", k=12, opponents=True, memory_budget=least_memory_budget(store, 10, 12)
    )
    assert opponents_streamed.equals(opponents_memory)


def test_opponents_are_the_most_negative(tmp_path, mlp_checkpoints):
    store = gradindex.build(MLP, mlp_checkpoints, tmp_path / "s.gradindex", projection="none", dtype="float32")
    vectors = store.read_features()
    task = tiny_tasks.mlp_task()
    query_vector = _exact_vectors(task, mlp_checkpoints, "test")[[2]]
    table = gradindex.query(store, samples=[2], k=5, opponents=True)
    all_scores = (vectors @ query_vector.T).ravel()
    np.testing.assert_array_equal(table.column("row").to_numpy(), np.argsort(all_scores)[:5])
    np.testing.assert_allclose(table.column("score").to_numpy(), np.sort(all_scores)[:5], rtol=1e-4, atol=1e-6)
    assert (table.column("score").to_numpy() < 0).all()


def _store_bytes(path: Path) -> dict[str, bytes]:
    """Every data file of a store (the manifest minus its timestamps)."""
    import json

    files = {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }
    manifest = json.loads((path / "zarr.json").read_text())["attributes"]["gradindex"]
    for key in ("created_at", "completed_at"):
        manifest.pop(key)
    files["manifest"] = json.dumps(manifest, sort_keys=True).encode()
    return files


def test_resume_after_a_killed_build_gives_the_same_bytes(tmp_path, mlp_checkpoints):
    reference = gradindex.build(MLP, mlp_checkpoints, tmp_path / "ref.gradindex", proj_dim=32, rows_per_shard=20)
    target = tmp_path / "killed.gradindex"
    code = (
        "import gradindex, sys; "
        f"gradindex.build({MLP!r}, {mlp_checkpoints!r}, {str(target)!r}, proj_dim=32, rows_per_shard=20)"
    )
    env = {**os.environ, "GRADINDEX_CRASH_AT": "shard-after-record", "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert killed.returncode == 137, killed.stderr
    partial = gradindex.open_store(target)
    assert not partial.complete and partial.done_shards() == [0]
    with pytest.raises(IncompleteStoreError, match="1/6 shards"):
        gradindex.query(partial, samples=[0])
    with pytest.raises(StoreExistsError, match="resume=True"):
        gradindex.build(MLP, mlp_checkpoints, target, proj_dim=32, rows_per_shard=20)
    resumed = gradindex.build(MLP, mlp_checkpoints, target, proj_dim=32, rows_per_shard=20, resume=True)
    assert resumed.complete
    assert _store_bytes(target) == _store_bytes(reference.path)


def test_resume_with_other_settings_names_the_field(tmp_path, mlp_checkpoints):
    gradindex.build(MLP, mlp_checkpoints, tmp_path / "s.gradindex", proj_dim=32)
    with pytest.raises(IncompatibleStoreError, match="projection.dim: store has 32, this call has 64.*overwrite=True"):
        gradindex.build(MLP, mlp_checkpoints, tmp_path / "s.gradindex", proj_dim=64, resume=True)
    with pytest.raises(IncompatibleStoreError, match=r"checkpoints\[1\].weight"):
        gradindex.build(
            MLP,
            [mlp_checkpoints[0], mlp_checkpoints[1].rsplit(":", 1)[0] + ":9", mlp_checkpoints[2]],
            tmp_path / "s.gradindex",
            proj_dim=32,
            resume=True,
        )
    with pytest.raises(IncompatibleStoreError, match="dataset.probe_sha256"):
        gradindex.build(
            f"{TINY}:mlp_task_other_data", mlp_checkpoints, tmp_path / "s.gradindex", proj_dim=32, resume=True
        )


def test_query_mismatches_are_clear(tmp_path, mlp_checkpoints):
    store = gradindex.build(MLP, mlp_checkpoints, tmp_path / "s.gradindex", proj_dim=32)
    with pytest.raises(
        IncompatibleStoreError, match=r"model\.parameters.*Query with the task the store was built from"
    ):
        gradindex.query(store, f"{TINY}:wide_mlp_task", samples=[0])
    with pytest.raises(IncompatibleStoreError, match="dataset"):
        gradindex.query(store, f"{TINY}:mlp_task_other_data", samples=[0])
    # a checkpoint file replaced after the build
    path = mlp_checkpoints[0].rsplit(":", 1)[0]
    torch.save(tiny_tasks.mlp().state_dict(), path)
    with pytest.raises(IncompatibleStoreError, match=r"checkpoints\[0\]\.sha256"):
        gradindex.query(store, samples=[0])
    Path(path).unlink()
    with pytest.raises(CheckpointError, match="is not there"):
        gradindex.query(store, samples=[0])


def test_query_argument_errors(tmp_path, mlp_checkpoints):
    store = gradindex.build(MLP, mlp_checkpoints, tmp_path / "s.gradindex", proj_dim=16, projection="rademacher")
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        gradindex.query(store, samples=[0], k=0)
    with pytest.raises(ValueError, match="out of range: the split has 20 samples"):
        gradindex.query(store, samples=[25])
    with pytest.raises(gradindex.TaskSpecError, match="no split 'val'"):
        gradindex.query(store, split="val", samples=[0])
    with pytest.raises(IncompatibleStoreError, match="dimension 48"):
        gradindex.search_store(store, np.zeros((1, 5), np.float32), 3)


def test_k_larger_than_the_store(tmp_path, mlp_checkpoints):
    store = gradindex.build(f"{TINY}:mlp_task", mlp_checkpoints[:1], tmp_path / "s.gradindex", proj_dim=8)
    table = gradindex.query(store, samples=[0], k=1000)
    assert table.num_rows == store.n_samples
    assert sorted(table.column("row").to_pylist()) == list(range(store.n_samples))


def test_sharded_workers_complete_one_store(tmp_path, mlp_checkpoints):
    reference = gradindex.build(MLP, mlp_checkpoints, tmp_path / "ref.gradindex", proj_dim=16, rows_per_shard=25)
    target = tmp_path / "workers.gradindex"
    first = gradindex.build(MLP, mlp_checkpoints, target, proj_dim=16, rows_per_shard=25, shard=(1, 2))
    assert not first.complete and first.done_shards() == [1, 3]
    second = gradindex.build(MLP, mlp_checkpoints, target, proj_dim=16, rows_per_shard=25, shard=(0, 2))
    assert second.complete
    assert _store_bytes(target) == _store_bytes(reference.path)


class _ItemByItem(torch.utils.data.Dataset):
    """The same samples as a TensorDataset, served one item at a time (the DataLoader path, not slicing)."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors[0])

    def __getitem__(self, index):
        return tuple(tensor[index] for tensor in self.tensors)


def test_sliced_and_item_by_item_loading_give_the_same_store(tmp_path, mlp_checkpoints):
    """A TensorDataset is sliced and hashed from its slices; any other data set is loaded and hashed item by item. The
    same samples must give the same vectors and the same per-shard content hashes (resume checks them) either way."""
    task = tiny_tasks.mlp_task()
    options = {"projection": "none", "dtype": "float32", "rows_per_shard": 48, "batch_size": 20}
    sliced = gradindex.build(task, mlp_checkpoints, tmp_path / "sliced.gradindex", **options)
    items = gradindex.Task(model=task.model, train=_ItemByItem(task.train.tensors), name=task.name)
    loaded = gradindex.build(items, mlp_checkpoints, tmp_path / "items.gradindex", **{**options, "batch_size": 13})
    assert [record["content_sha256"] for record in sliced.manifest["shards"]] == [
        record["content_sha256"] for record in loaded.manifest["shards"]
    ]
    np.testing.assert_array_equal(sliced.read_features(), loaded.read_features())
    # and an edited sample changes its shard's hash on the sliced path too
    edited = gradindex.Task(
        model=task.model, train=torch.utils.data.TensorDataset(task.train.tensors[0].clone(), task.train.tensors[1])
    )
    edited.train.tensors[0][50, 0] += 1.0
    other = gradindex.build(edited, mlp_checkpoints, tmp_path / "edited.gradindex", **options)
    changed = [
        a["content_sha256"] != b["content_sha256"] for a, b in zip(sliced.manifest["shards"], other.manifest["shards"])
    ]
    assert changed == [False, True, False]


def test_a_task_file_shipped_inside_a_store_is_never_run(tmp_path, mlp_checkpoints):
    """A store is shared data: a manifest that names a task file inside the store (code it brings along) is refused
    before anything is imported; naming the task explicitly works."""
    import json

    from gradindex.store import write_manifest

    store = gradindex.build(tiny_tasks.mlp_task(), mlp_checkpoints, tmp_path / "s.gradindex", proj_dim=16)
    planted = store.path / "evil.py"
    marker = tmp_path / "ran"
    planted.write_text(f"open({str(marker)!r}, 'w').close()\n\ndef task():\n    raise SystemExit(3)\n")
    manifest = json.loads((store.path / "zarr.json").read_text())["attributes"]["gradindex"]
    manifest["task"] = {"spec": f"{planted}:task", "name": "evil"}
    write_manifest(store.path, manifest)
    with pytest.raises(gradindex.TaskSpecError, match="records a task file inside itself.*pass task=SPEC"):
        gradindex.query(store.path, samples=[0], k=2)
    assert not marker.exists()
    assert gradindex.query(store.path, tiny_tasks.mlp_task(), samples=[0], k=2).num_rows == 2
