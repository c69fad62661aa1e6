"""The command line through click's CliRunner: help, formats, and one-sentence errors."""

from __future__ import annotations

import itertools
import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from tiny_tasks import TINY

from gradindex.cli import cli

MLP = f"{TINY}:mlp_task"


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def built(runner, tmp_path, mlp_checkpoints):
    store = tmp_path / "s.gradindex"
    args = ["build", "--task", MLP, "-o", str(store), "--proj-dim", "32", "--rows-per-shard", "50"]
    for checkpoint in mlp_checkpoints:
        args += ["--checkpoint", checkpoint]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "complete" in result.output
    return store


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name), command


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help_with_an_example(runner, name):
    result = runner.invoke(cli, [name, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert f"gradindex {name}" in result.output


def test_top_level_help_and_version(runner):
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0 and "Example:" in result.output
    for name in ("build", "query", "self-influence", "info", "verify", "demo"):
        assert name in result.output
    version = runner.invoke(cli, ["--version"])
    assert version.exit_code == 0 and "gradindex" in version.output


def test_query_formats(runner, built, tmp_path):
    table = runner.invoke(cli, ["query", str(built), "--samples", "0,1", "-k", "3"])
    assert table.exit_code == 0, table.output
    lines = table.output.strip().splitlines()
    assert lines[0].split() == ["query", "query_id", "rank", "row", "sample_id", "score"]
    assert len(lines) == 1 + 2 * 3
    jsonl = runner.invoke(cli, ["query", str(built), "--samples", "4", "-k", "2", "--format", "jsonl"])
    rows = [json.loads(line) for line in jsonl.output.strip().splitlines()]
    assert [row["rank"] for row in rows] == [1, 2] and all(row["query_id"] == 4 for row in rows)
    assert rows[0]["score"] >= rows[1]["score"]
    out = tmp_path / "q.parquet"
    parquet = runner.invoke(
        cli, ["query", str(built), "--samples", "0-2", "-k", "4", "--format", "parquet", "-o", str(out)]
    )
    assert parquet.exit_code == 0, parquet.output
    assert pq.read_table(out).num_rows == 12
    csv = runner.invoke(cli, ["query", str(built), "--samples", "1", "-k", "2", "--opponents", "--format", "csv"])
    lines = csv.output.strip().splitlines()
    assert lines[0] == '"query","query_id","rank","row","sample_id","score"' and len(lines) == 3
    assert all(float(line.split(",")[-1]) < 0 for line in lines[1:])


def test_self_influence_info_verify(runner, built):
    ranking = runner.invoke(cli, ["self-influence", str(built), "--top", "5", "--format", "json"])
    rows = json.loads(ranking.output)
    assert [row["rank"] for row in rows] == [1, 2, 3, 4, 5]
    assert all(a["score"] >= b["score"] for a, b in itertools.pairwise(rows))
    info = runner.invoke(cli, ["info", str(built), "--format", "json"])
    details = json.loads(info.output)
    assert details["state"] == "complete" and details["layout"]["n_samples"] == 120
    assert details["fingerprint"]["projection"]["dim"] == 32
    text = runner.invoke(cli, ["info", str(built)])
    assert "complete" in text.output and "checkpoint  [2]" in text.output
    assert runner.invoke(cli, ["verify", str(built)]).exit_code == 0
    (built / "features" / "c" / "1" / "0").write_bytes(b"garbage")
    broken = runner.invoke(cli, ["verify", str(built)])
    assert broken.exit_code == 1
    assert "shard 1: features/c/1/0 fails its checksum" in broken.output


def _assert_clean_error(result, pattern):
    import re

    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert re.search(pattern, result.output), result.output


def test_bad_inputs_exit_with_one_clear_sentence(runner, built, tmp_path, mlp_checkpoints):
    _assert_clean_error(
        runner.invoke(cli, ["query", str(tmp_path / "missing.gradindex")]),
        r"Error: no gradindex store at .*missing.gradindex; build one",
    )
    _assert_clean_error(
        runner.invoke(cli, ["build", "--task", "no-such-task", "--checkpoint", "a.pt", "-o", str(tmp_path / "x")]),
        r"unknown task 'no-such-task'; give path/to/file.py:factory",
    )
    _assert_clean_error(
        runner.invoke(cli, ["build", "--task", f"{TINY}:nope", "--checkpoint", "a.pt", "-o", str(tmp_path / "x")]),
        r"has no attribute 'nope'",
    )
    _assert_clean_error(
        runner.invoke(
            cli,
            ["build", "--task", f"{TINY}:not_a_task", "--checkpoint", mlp_checkpoints[0], "-o", str(tmp_path / "x")],
        ),
        r"returned int, not a gradindex.Task",
    )
    _assert_clean_error(
        runner.invoke(cli, ["build", "--task", MLP, "--checkpoint", "ckpt.pt:fast", "-o", str(tmp_path / "x")]),
        r"the weight after ':' must be a number",
    )
    _assert_clean_error(
        runner.invoke(
            cli, ["build", "--task", MLP, "--checkpoint", str(tmp_path / "gone.pt"), "-o", str(tmp_path / "x")]
        ),
        r"gone.pt does not exist; check its path",
    )
    _assert_clean_error(
        runner.invoke(cli, ["query", str(built), "-k", "0"]), r"Invalid value for '-k': 0 is not in the range x>=1"
    )
    _assert_clean_error(
        runner.invoke(cli, ["query", str(built), "--task", f"{TINY}:wide_mlp_task", "--samples", "0"]),
        r"does not match this call: model\.parameters",
    )
    _assert_clean_error(
        runner.invoke(cli, ["query", str(built), "--samples", "0-x"]), r"--samples '0-x' must be indices and ranges"
    )
    _assert_clean_error(
        runner.invoke(cli, ["query", str(built), "--samples", "0", "--all"]), r"give --samples or --all, not both"
    )
    resume = [
        "build",
        "--task",
        MLP,
        "-o",
        str(built),
        "--proj-dim",
        "64",
        "--resume",
        *(arg for c in mlp_checkpoints for arg in ("--checkpoint", c)),
    ]
    _assert_clean_error(runner.invoke(cli, resume), r"projection\.dim: store has 32, this call has 64")
    _assert_clean_error(
        runner.invoke(cli, ["build", "--task", MLP, "--checkpoint", mlp_checkpoints[0], "-o", str(built)]),
        r"already exists; pass --resume to continue its build or --overwrite",
    )
    _assert_clean_error(
        runner.invoke(
            cli,
            ["build", "--task", MLP, "--checkpoint", mlp_checkpoints[0], "-o", str(tmp_path / "y"), "--shard", "3/2"],
        ),
        r"needs 0 <= I < N",
    )
    _assert_clean_error(
        runner.invoke(cli, ["query", str(built), "--format", "parquet"]), r"--format parquet needs -o FILE"
    )


# ---- --task-arg ------------------------------------------------------------------------------------------------------


TASK_ARGS = {
    "3": 3,
    "-2": -2,
    "0.1": 0.1,
    "1e-3": 1e-3,
    ".5": 0.5,
    "true": True,
    "False": False,
    "runs/gpt2": "runs/gpt2",
    "train.jsonl": "train.jsonl",
    "1.2.3": "1.2.3",
    "nan": "nan",
    "": "",
}
ECHO_TASK = """import json, sys
sys.path.insert(0, {tests!r})
import tiny_tasks

def task(**options):
    with open({out!r}, "w") as sink:
        json.dump({{key: [type(value).__name__, value] for key, value in options.items()}}, sink)
    return tiny_tasks.mlp_task()
"""


def test_task_arg_values_are_typed_when_they_look_like_numbers_or_booleans(runner, built, tmp_path):
    from tiny_tasks import TINY

    out = tmp_path / "options.json"
    echo = tmp_path / "echo.py"
    echo.write_text(ECHO_TASK.format(tests=str(TINY.rsplit("/", 1)[0]), out=str(out)))
    args = ["query", str(built), "--task", f"{echo}:task", "--samples", "0", "-k", "1"]
    for position, text in enumerate(TASK_ARGS):
        args += ["--task-arg", f"option_{position}={text}"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    received = json.loads(out.read_text())
    for position, value in enumerate(TASK_ARGS.values()):
        assert received[f"option_{position}"] == [type(value).__name__, value]


def test_task_args_are_recorded_and_reused_by_a_query_in_another_process(runner, tmp_path, mlp_checkpoints):
    import os
    import subprocess
    import sys

    import gradindex

    store = tmp_path / "opts.gradindex"
    args = ["-q", "build", "--task", MLP, "--task-arg", "n_train=60", "--task-arg", "n_test=7", "-o", str(store)]
    args += ["--proj-dim", "16", *(arg for c in mlp_checkpoints for arg in ("--checkpoint", c))]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    opened = gradindex.open_store(store)
    assert opened.n_samples == 60
    assert opened.manifest["task"]["options"] == {"n_train": 60, "n_test": 7}
    info = runner.invoke(cli, ["info", str(store)])
    assert '"options": {"n_test": 7, "n_train": 60}' in info.output
    # a fresh interpreter: no --task, the recorded spec and options (ARROW_DEFAULT_MEMORY_POOL=system: pyarrow's
    # mimalloc pool and torch can abort the interpreter at exit after the output is written; the lead tracks it)
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"}
    command = [sys.executable, "-c", "from gradindex.cli import main; main()", "query", str(store), "--all", "-k", "1"]
    other = subprocess.run([*command, "--format", "json"], capture_output=True, text=True, env=env, timeout=300)
    assert other.returncode == 0, other.stderr
    rows = json.loads(other.stdout)
    assert [row["query_id"] for row in rows] == list(range(7))  # the recorded n_test=7, not the factory's 20
    assert [row["row"] for row in rows] == gradindex.query(store, k=1).column("row").to_pylist()
    # a given option updates the recorded ones; with --task, only the given ones count
    three = runner.invoke(cli, ["query", str(store), "--task-arg", "n_test=3", "-k", "1", "--format", "json"])
    assert three.exit_code == 0, three.output
    assert [row["query_id"] for row in json.loads(three.output)] == [0, 1, 2]
    _assert_clean_error(
        runner.invoke(cli, ["query", str(store), "--task", MLP, "-k", "1"]),
        r"dataset.n_samples: store has 60, this call has 120",
    )


def test_bad_task_args_exit_with_one_clear_sentence(runner, built, tmp_path, mlp_checkpoints):
    _assert_clean_error(
        runner.invoke(cli, ["query", str(built), "--task-arg", "n_train"]),
        r"Invalid value for '--task-arg': 'n_train' must look like KEY=VALUE, e.g. flip_fraction=0.1",
    )
    _assert_clean_error(
        runner.invoke(cli, ["query", str(built), "--task-arg", "2x=1"]),
        r"'2x' is not a keyword the task factory can take",
    )
    _assert_clean_error(
        runner.invoke(cli, ["query", str(built), "--task-arg", "n_test=1", "--task-arg", "n_test=2"]),
        r"n_test is given twice; give each task option once",
    )
    _assert_clean_error(
        runner.invoke(cli, ["build", "--finalize", "-o", str(built), "--task-arg", "n_test=2"]),
        r"--finalize takes only -o STORE",
    )
    _assert_clean_error(
        runner.invoke(cli, ["curate", str(built), "--drop-top", "5", "--task-arg", "n_test=2", "-o", "k.csv"]),
        r"--samples, --task, --task-arg and --checkpoint pick target queries for --select",
    )
    _assert_clean_error(
        runner.invoke(cli, ["query", str(built), "--task-arg", "n_tset=2", "-k", "1"]),
        r"n_tset",
    )
