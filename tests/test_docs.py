"""Documentation and conventions: the generated CLI reference is current, the README documents what
the CLI does (exit codes, --format json, NO_COLOR, progress), and the library never prints."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from tiny_tasks import TINY

import gradindex
from gradindex.cli import cli
from gradindex.cli.docs import REGENERATE, render
from gradindex.cli.docs import main as docs_main
from gradindex.utils import progress_bar, progress_enabled

ROOT = Path(__file__).resolve().parents[1]
MLP = f"{TINY}:mlp_task"


def test_cli_reference_matches_the_commands():
    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == render(), f"docs/cli.md is stale; regenerate it with `{REGENERATE}`"


def test_cli_reference_covers_every_command_and_option():
    text = render()
    root = click.Context(cli, info_name="gradindex")
    for name in cli.list_commands(root):
        command = cli.get_command(root, name)
        assert f"## `gradindex {name}`" in text
        for param in command.params:
            for option in getattr(param, "opts", []):
                if option.startswith("-"):
                    assert option in text, f"{option} of {name} is missing from the reference"


def test_the_docs_check_says_how_to_regenerate(tmp_path, capsys):
    stale = tmp_path / "cli.md"
    stale.write_text("old\n")
    assert docs_main(["--check", str(stale)]) == 1
    assert f"is stale; regenerate it with `{REGENERATE}`" in capsys.readouterr().err
    assert docs_main(["-o", str(stale)]) == 0 and docs_main(["--check", str(stale)]) == 0


def test_readme_keeps_its_setup_commands_first_and_documents_the_conventions():
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    assert lines[2] == "```bash"
    assert lines[3].startswith("pip install torch==2.13.0 && pip install -e . && gradindex demo")
    assert lines[4].startswith('pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q')
    for heading in (
        "## Concepts",
        "## Command-line reference",
        "## Scripting: formats, exit codes, colour, progress",
        "## The store format",
        "## Worked example",
        "## Reports",
        "## Curation",
        "## Examples",
    ):
        assert heading in readme, heading
    assert "docs/cli.md" in readme and REGENERATE in readme
    for code, meaning in (("0", "success"), ("1", "error"), ("2", "usage")):
        assert re.search(rf"`{code}`\s*\|\s*{meaning}", readme), f"exit code {code} is not documented"
    for method in ("tracin", "gex", "arnoldi", "if", "trak"):
        assert f"`{method}`" in readme


def test_every_example_script_is_documented():
    readme = (ROOT / "README.md").read_text()
    for script in sorted((ROOT / "examples").glob("*.py")):
        assert f"examples/{script.name}" in readme, script.name


# ---- conventions --------------------------------------------------------------------------------


def test_the_library_never_prints():
    offenders = []
    for path in sorted((ROOT / "gradindex").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == [], f"use logging (or an echo callable) instead of print: {offenders}"


@pytest.fixture
def built(tmp_path, mlp_checkpoints):
    store = tmp_path / "s.gradindex"
    args = ["-q", "build", "--task", MLP, "-o", str(store), "--proj-dim", "16", "--format", "json"]
    for checkpoint in mlp_checkpoints:
        args += ["--checkpoint", checkpoint]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return store, json.loads(result.stdout)


def test_format_json_everywhere(built, tmp_path):
    store, summary = built
    assert summary == {
        "store": str(store),
        "n_samples": 120,
        "dim": 48,
        "dtype": "float16",
        "complete": True,
        "progress": "3/3 shards (120/120 rows)",
    } or (summary["store"] == str(store) and summary["n_samples"] == 120 and summary["complete"] is True)
    runner = CliRunner()
    commands = {
        "verify": ["verify", str(store), "--format", "json"],
        "info": ["info", str(store), "--format", "json"],
        "self-influence": ["self-influence", str(store), "--top", "3", "--format", "json"],
        "query": ["-q", "query", str(store), "--samples", "0", "-k", "2", "--format", "json"],
        "curate": ["curate", str(store), "--drop-top", "3", "-o", str(tmp_path / "k.parquet"), "--format", "json"],
        "report": [
            "-q",
            "report",
            str(store),
            "--queries",
            "none",
            "--top",
            "2",
            "-o",
            str(tmp_path / "r.html"),
            "--format",
            "json",
        ],
    }
    for name, args in commands.items():
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, (name, result.output)
        json.loads(result.stdout)  # one JSON document on stdout
    assert json.loads(runner.invoke(cli, commands["verify"]).stdout) == {
        "store": str(store),
        "ok": True,
        "problems": [],
    }
    (store / "self_influence" / "c" / "0").write_bytes(b"broken")
    broken = runner.invoke(cli, commands["verify"])
    assert broken.exit_code == 1
    assert json.loads(broken.stdout)["problems"] == ["shard 0: self_influence/c/0 fails its checksum"]


def test_exit_codes(built, tmp_path):
    store, _ = built
    runner = CliRunner()
    assert runner.invoke(cli, ["info", str(store)]).exit_code == 0
    missing = runner.invoke(cli, ["info", str(tmp_path / "missing.gradindex")])
    assert missing.exit_code == 1 and "Error: no gradindex store at" in missing.output
    usage = runner.invoke(cli, ["info", str(store), "--no-such-option"])
    assert usage.exit_code == 2 and "No such option '--no-such-option'" in usage.output
    assert runner.invoke(cli, ["--version"]).output.strip() == f"gradindex, version {gradindex.__version__}"


def test_no_color_strips_styles(built, monkeypatch):
    store, _ = built
    monkeypatch.setattr(gradindex, "verify", lambda path: [click.style("shard 0: styled problem", fg="red")])
    runner = CliRunner()
    coloured = runner.invoke(cli, ["verify", str(store)], color=True, env={"NO_COLOR": ""})
    assert coloured.exit_code == 1 and "\x1b[31m" in coloured.output  # the control: colour reaches a colour terminal
    plain = runner.invoke(cli, ["verify", str(store)], color=True, env={"NO_COLOR": "1"})
    assert plain.exit_code == 1 and "shard 0: styled problem" in plain.output and "\x1b[" not in plain.output


# ---- progress -------------------------------------------------------------------------------------


def test_progress_bar_shows_rate_and_eta_only_when_enabled(capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with progress_bar(10, "featurize x", enabled=True, leave=True) as bar:
        bar.update(10)
    shown = capsys.readouterr().err
    assert re.search(r"featurize x: 100%.*10/10 \[\d\d:\d\d<\d\d:\d\d, .*sample/s\]", shown), shown  # elapsed<ETA, rate
    with progress_bar(10, "quiet", enabled=False) as bar:
        bar.update(10)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    with progress_bar(10, "env", enabled=True) as bar:
        bar.update(10)
    assert capsys.readouterr().err == ""


def test_progress_follows_the_terminal_when_not_told(monkeypatch):
    class Terminal:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.setattr(sys, "stderr", Terminal(False))
    assert progress_enabled(None) is False and progress_enabled(True) is True
    monkeypatch.setattr(sys, "stderr", Terminal(True))
    assert progress_enabled(None) is True and progress_enabled(False) is False


def test_build_and_query_report_progress_unless_quiet(tmp_path, mlp_checkpoints, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    store = gradindex.build(
        MLP, mlp_checkpoints, tmp_path / "p.gradindex", proj_dim=16, rows_per_shard=50, progress=True
    )
    shown = capsys.readouterr().err
    assert "featurize p.gradindex (3 checkpoints)" in shown and "/120 [" in shown and "sample/s" in shown
    gradindex.query(store, samples=[0, 1], k=2, progress=True, memory_budget=1)  # streamed: a bar over the store's rows
    shown = capsys.readouterr().err
    assert "featurize queries" in shown and "search p.gradindex" in shown and "row/s" in shown
    gradindex.build(MLP, mlp_checkpoints, tmp_path / "q.gradindex", proj_dim=16, progress=False)
    gradindex.query(store, samples=[0], k=2, progress=False)
    assert capsys.readouterr().err == ""
    # the CLI's --quiet reaches the library
    result = CliRunner().invoke(
        cli, ["-q", "query", str(store.path), "--samples", "0", "-k", "1", "--memory-budget", "1"]
    )
    assert result.exit_code == 0 and "row/s" not in result.stderr and "sample/s" not in result.stderr
