"""The build's background shard writer: a failed write surfaces as the store's own error, its shard stays unwritten
(claim released) and a resume completes the store with the vectors a build in one go writes."""

from __future__ import annotations

import numpy as np
import pytest
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
