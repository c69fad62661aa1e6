"""Which device a build process uses: one GPU per torchrun rank (``LOCAL_RANK``), checked without a GPU through the
resolution rule itself; and a CPU build under torchrun's environment."""

from __future__ import annotations

import pytest
from tiny_tasks import TINY

import gradindex
from gradindex import ArgumentError
from gradindex.pipeline import rank_device


@pytest.mark.parametrize(
    ("asked", "local_rank", "cuda_count", "used"),
    [
        ("auto", None, 4, "auto"),  # not under torchrun: as asked
        ("cuda", None, 4, "cuda"),
        ("auto", "3", 4, "cuda:3"),  # rank 3 of a node of 4 GPUs
        ("cuda", "0", 4, "cuda:0"),
        ("cuda", "1", 2, "cuda:1"),
        ("cpu", "2", 4, "cpu"),  # asked for the CPU: kept
        ("cuda:0", "2", 4, "cuda:0"),  # asked for one GPU by number: kept
        ("auto", "1", 0, "auto"),  # no CUDA: auto stays the CPU
        ("cuda", "1", 0, "cuda"),  # no CUDA: resolve_device refuses it with its own sentence
    ],
)
def test_torchrun_ranks_each_take_their_local_gpu(asked, local_rank, cuda_count, used):
    environ = {} if local_rank is None else {"LOCAL_RANK": local_rank, "RANK": "5", "WORLD_SIZE": "8"}
    assert rank_device(asked, environ, cuda_count=cuda_count) == used


def test_a_local_rank_beyond_the_nodes_gpus_is_refused_naming_the_fix():
    with pytest.raises(ArgumentError, match=r"LOCAL_RANK=4 .* sees 4 CUDA device\(s\) .*--nproc-per-node 4"):
        rank_device("auto", {"LOCAL_RANK": "4"}, cuda_count=4)
    with pytest.raises(ArgumentError, match="LOCAL_RANK must be a non-negative integer, got 'x'"):
        rank_device("cuda", {"LOCAL_RANK": "x"}, cuda_count=4)


def test_a_cpu_build_under_torchrun_builds_its_rank_of_the_shards(tmp_path, mlp_checkpoints, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    store = gradindex.build(
        f"{TINY}:mlp_task", mlp_checkpoints, tmp_path / "s.gradindex", proj_dim=8, rows_per_shard=50, device="cpu"
    )
    assert store.done_shards() == [1]  # shards 1, 3, ... of 3: this rank's
