"""Two real worker processes build one store (--shard I/N, torchrun's RANK/WORLD_SIZE); --finalize completes it.

The result is byte-identical to a one-process build: every data file, and the manifest less its timestamps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_tasks import TINY

import gradindex
from gradindex import IncompleteStoreError
from gradindex.cli import cli

sys.path.insert(0, str(Path(__file__).parent))  # this folder's helpers (_compare, grow_tasks)
from _compare import assert_same_store

MLP = f"{TINY}:mlp_task"


def _build_command(store, checkpoints, *extra):
    command = [
        sys.executable,
        "-c",
        "from gradindex.cli import main; main()",
        "-q",
        "build",
        "--task",
        MLP,
        "-o",
        str(store),
        "--proj-dim",
        "16",
        "--rows-per-shard",
        "20",
        "--format",
        "json",
        *extra,
    ]
    for checkpoint in checkpoints:
        command += ["--checkpoint", checkpoint]
    return command


def _env(**extra):
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "GRADINDEX_CRASH_AT")}
    return {**env, "PYTHONPATH": os.pathsep.join(sys.path), **extra}


def test_two_processes_build_the_same_bytes_as_one(tmp_path, mlp_checkpoints):
    target = tmp_path / "two.gradindex"
    # one worker told by --shard, the other by torchrun's variables, both at once
    workers = [
        subprocess.Popen(
            _build_command(target, mlp_checkpoints, "--shard", "0/2"), env=_env(), stdout=subprocess.PIPE, text=True
        ),
        subprocess.Popen(
            _build_command(target, mlp_checkpoints),
            env=_env(RANK="1", WORLD_SIZE="2"),
            stdout=subprocess.PIPE,
            text=True,
        ),
    ]
    single = gradindex.build(MLP, mlp_checkpoints, tmp_path / "one.gradindex", proj_dim=16, rows_per_shard=20)
    outputs = [json.loads(process.communicate(timeout=240)[0]) for process in workers]
    assert [process.returncode for process in workers] == [0, 0]
    assert single.complete and single.n_samples == 120
    # whichever worker finished the last shard completed the store; --finalize then has nothing left to do
    assert any(output["complete"] for output in outputs)
    finalized = CliRunner().invoke(cli, ["build", "--finalize", "-o", str(target), "--format", "json"])
    assert finalized.exit_code == 0, finalized.output
    assert json.loads(finalized.output)["complete"]
    assert gradindex.open_store(target).n_shards == 6
    assert_same_store(target, tmp_path / "one.gradindex")


def test_finalize_merges_the_records_of_workers_that_did_not(tmp_path, mlp_checkpoints):
    target = tmp_path / "s.gradindex"
    # two workers' shards written without either completing the store (as if both stopped before finalizing)
    for index in (0, 1):
        gradindex.build(MLP, mlp_checkpoints, target, proj_dim=16, rows_per_shard=20, shard=(index, 3))
    store = gradindex.open_store(target)
    assert not store.complete and store.done_shards() == [0, 1, 3, 4]
    runner = CliRunner()
    early = runner.invoke(cli, ["build", "--finalize", "-o", str(target)])
    assert early.exit_code == 1
    assert "cannot be finalized: 2 of 6 shards are not written (2, 5); run the workers for them" in early.output
    with pytest.raises(IncompleteStoreError, match=r"\(2, 5\)"):
        gradindex.finalize(target)
    # the third worker's shards, written by a process that is stopped before it can finalize
    code = (
        f"import gradindex, sys; gradindex.build({MLP!r}, {mlp_checkpoints!r}, {str(target)!r}, "
        "proj_dim=16, rows_per_shard=20, shard=(2, 3))"
    )
    env = _env(GRADINDEX_CRASH_AT="finalize-before-manifest")
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 137
    assert not gradindex.open_store(target).complete
    done = runner.invoke(cli, ["build", "--finalize", "-o", str(target)])
    assert done.exit_code == 0, done.output
    assert gradindex.open_store(target).complete
    reference = gradindex.build(MLP, mlp_checkpoints, tmp_path / "ref.gradindex", proj_dim=16, rows_per_shard=20)
    assert_same_store(target, reference.path)
    usage = runner.invoke(cli, ["build", "--finalize", "-o", str(target), "--task", MLP])
    assert usage.exit_code == 2 and "--finalize takes only -o STORE" in usage.output
    missing = runner.invoke(cli, ["build", "-o", str(target)])
    assert missing.exit_code == 2 and "build needs --task and at least one --checkpoint" in missing.output
