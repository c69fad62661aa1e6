"""The build's background shard writer: a failed write surfaces as the store's own error, its shard stays unwritten
(claim released) and a resume completes the store with the vectors a build in one go writes."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_tasks
import torch
from tiny_tasks import TINY

import gradindex
from gradindex import StorageError
from gradindex.store import GradientStore

MLP = f"{TINY}:mlp_task"


def test_a_failed_background_write_surfaces_and_resume_completes(tmp_path, mlp_checkpoints, monkeypatch):
    options = {"projection": "none", "dtype": "float32", "rows_per_shard": 32}
    write_shard = GradientStore.write_shard
    written = []

    def failing(self, shard, *args, **kwargs):
        if shard == 1:
            raise StorageError(f"cannot write shard {shard} of store {self.path}: no space left on device; free space")
        written.append(shard)
        return write_shard(self, shard, *args, **kwargs)

    monkeypatch.setattr(GradientStore, "write_shard", failing)
    output = tmp_path / "s.gradindex"
    with pytest.raises(StorageError, match=r"^cannot write shard 1 of store .*: no space left on device; free space$"):
        gradindex.build(MLP, mlp_checkpoints, output, **options)
    store = gradindex.open_store(output)
    assert written == [0] and not store.complete
    assert store.shard_record(0) is not None and store.shard_record(1) is None and store.shard_record(2) is None
    monkeypatch.setattr(GradientStore, "write_shard", write_shard)
    resumed = gradindex.build(MLP, mlp_checkpoints, output, resume=True, **options)
    assert resumed.complete
    whole = gradindex.build(MLP, mlp_checkpoints, tmp_path / "whole.gradindex", **options)
    np.testing.assert_array_equal(resumed.read_features(), whole.read_features())
    for got, expected in zip(resumed.self_influence(), whole.self_influence()):
        np.testing.assert_array_equal(got, expected)


class _BreaksAt(torch.utils.data.Dataset):
    """The tiny MLP task's training rows, whose row ``broken`` raises when loaded."""

    def __init__(self, rows: torch.utils.data.Dataset, broken: int):
        self.rows, self.broken = rows, broken

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        if index == self.broken:
            raise OSError(f"row {index} is unreadable")
        return self.rows[index]


def test_a_shard_stopped_midway_leaves_no_temporary_file(tmp_path, mlp_checkpoints):
    """A shard's features file is streamed to a temporary name as its batches are encoded; a build stopped in the
    middle of a shard (here by its data, after two batches were written) removes it and leaves no new folder, and a
    resume writes the bytes a build in one go writes."""
    task = tiny_tasks.mlp_task()
    options = {"projection": "none", "rows_per_shard": 64, "batch_size": 16, "progress": False}
    output = tmp_path / "s.gradindex"
    broken = gradindex.Task(model=task.model, train=_BreaksAt(task.train, 64 + 40), test=task.test, name=task.name)
    with pytest.raises(
        gradindex.TaskSpecError,
        match=r"^the task.s data, model or loss failed on training rows 96\.\.111 \(loading them\): OSError: row 104 ",
    ):
        gradindex.build(broken, mlp_checkpoints, output, **options)
    store = gradindex.open_store(output)
    assert store.done_shards() == [0]
    assert [path.name for path in output.rglob("*") if ".gi-tmp-" in path.name] == []
    assert not (output / "features" / "c" / "1").exists()  # shard 1's folder is made only when its file is put there
    resumed = gradindex.build(task, mlp_checkpoints, output, resume=True, **options)
    whole = gradindex.build(task, mlp_checkpoints, tmp_path / "whole.gradindex", **options)
    for shard in range(whole.n_shards):
        key = whole._keys(shard)[0]
        assert (resumed.path / key).read_bytes() == (whole.path / key).read_bytes()
