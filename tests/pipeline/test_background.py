"""The build's background thread (content hashing, shard encoding) in a process forked after a build: the child must
start its own, not wait forever on its parent's thread, which a fork does not copy."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch
from tiny_tasks import mlp, mlp_task, save_checkpoints

import gradindex


def _child_build(checkpoints: list[str], out: str, queue) -> None:
    torch.set_num_threads(1)  # torch's OpenMP pool does not survive a fork either (a torch limit, not gradindex's)
    store = gradindex.build(mlp_task(), checkpoints, out, proj_dim=16, progress=False)
    queue.put(store.read_features().tolist())


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork start method here")
def test_a_forked_child_builds_after_its_parent_did(tmp_path):
    checkpoints = save_checkpoints(mlp, tmp_path)
    parent = gradindex.build(mlp_task(), checkpoints, tmp_path / "parent.gradindex", proj_dim=16, progress=False)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_build, args=(checkpoints, str(tmp_path / "child.gradindex"), queue))
    child.start()
    child.join(timeout=60)
    assert not child.is_alive(), "the forked child's build hung on its parent's background thread"
    child.kill()
    assert child.exitcode == 0
    np.testing.assert_array_equal(np.asarray(queue.get(timeout=5)), parent.read_features())
