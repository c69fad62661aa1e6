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
