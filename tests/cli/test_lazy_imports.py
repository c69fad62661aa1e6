"""Commands that do not featurize start without torch or faiss: --help, --version, every command's --help, info,
verify, self-influence of the stored column and index --list, each run in a fresh interpreter on a real store whose
sys.modules is then looked at. Importing gradindex alone loads neither either, and every public name still resolves."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from tiny_tasks import TINY

import gradindex
from gradindex.cli import cli

HEAVY = ("torch", "faiss", "transformers", "sklearn")

# runs the commands given as JSON lists one after another in this interpreter, then says what they loaded
_PROBE = textwrap.dedent(
    """
    import json, sys
    from gradindex.cli import cli
    exits = []
    for args in json.loads(sys.argv[1]):
        try:
            cli.main(args, prog_name="gradindex", standalone_mode=False)
            exits.append(0)
        except SystemExit as stop:
            exits.append(stop.code)
    sys.stdout.flush()
    print("\\n@@" + json.dumps({"exits": exits, "loaded": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
    """
)


def _run(commands: list[list[str]]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(commands), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return {"output": done.stdout.rpartition("\n@@")[0], **json.loads(done.stdout.rpartition("\n@@")[2])}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import tiny_tasks

    folder = tmp_path_factory.mktemp("lazy")
    checkpoints = tiny_tasks.save_checkpoints(tiny_tasks.mlp, folder)
    store = folder / "s.gradindex"
    args = ["build", "--task", f"{TINY}:mlp_task", "-o", str(store), "--proj-dim", "16", "--rows-per-shard", "50"]
    for checkpoint in checkpoints:
        args += ["--checkpoint", checkpoint]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    gradindex.build_index(store, "IVF2,Flat", recall_queries=20)  # so that index --list has one to read
    return str(store)


def test_importing_gradindex_loads_neither_torch_nor_faiss():
    probe = "import sys, gradindex, gradindex.store, gradindex.search, gradindex.pipeline; print(sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert not [name for name in HEAVY if f"'{name}'" in loaded]


def test_every_public_name_still_resolves():
    for name in gradindex.__all__:
        assert getattr(gradindex, name) is not None, name
    assert set(gradindex.__all__) <= set(dir(gradindex))
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        gradindex.nonexistent  # noqa: B018


def test_help_and_version_of_every_command_load_neither():
    commands = [["--help"], ["--version"]] + [[name, "--help"] for name in sorted(cli.commands)]
    result = _run(commands)
    assert result["exits"] == [0] * len(commands)
    assert "gradindex build" in result["output"] and "Example:" in result["output"]
    assert result["loaded"] == []


def test_store_commands_that_do_not_featurize_load_neither(built):
    commands = [
        ["info", built],
        ["info", built, "--format", "json"],
        ["verify", built],
        ["self-influence", built, "--top", "5", "--format", "jsonl"],
        ["index", built, "--list"],
    ]
    result = _run(commands)
    assert result["exits"] == [0] * len(commands), result["output"]
    assert "every shard matches its checksum" in result["output"]
    assert "ivf2-flat: IVF2,Flat (120 rows), recall@10=" in result["output"]
    scores = [json.loads(line) for line in result["output"].splitlines() if line.startswith('{"rank"')]
    assert [row["rank"] for row in scores] == [1, 2, 3, 4, 5]
    assert result["loaded"] == []


def test_the_stored_column_matches_what_a_featurizing_process_reads(built):
    """The light path and the library's in-process path (torch loaded) rank the same rows with the same scores."""
    table = gradindex.self_influence(built, top=5).to_pylist()
    result = _run([["self-influence", built, "--top", "5", "--format", "jsonl"]])
    rows = [json.loads(line) for line in result["output"].splitlines() if line.startswith("{")]
    assert [(row["row"], round(row["score"], 5)) for row in rows] == [
        (row["row"], round(row["score"], 5)) for row in table
    ]


def test_index_list_in_json_and_its_mistakes(built):
    runner = CliRunner()
    listed = runner.invoke(cli, ["index", built, "--list", "--format", "json"])
    assert listed.exit_code == 0 and [meta["name"] for meta in json.loads(listed.output)] == ["ivf2-flat"]
    both = runner.invoke(cli, ["index", built, "--list", "--factory", "Flat"])
    assert both.exit_code == 2 and "not both" in both.output
    neither = runner.invoke(cli, ["index", built])
    assert neither.exit_code == 2 and "--factory" in neither.output and "--list" in neither.output


def test_asking_a_server_loads_neither(built):
    """A client of ``gradindex serve`` (the CLI with --server, and gradindex.connect) loads neither torch nor faiss,
    and gets the rows the direct command prints."""
    server = subprocess.Popen(
        [sys.executable, "-c", "from gradindex.cli import main; main()", "serve", built, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("grpc://127.0.0.1:"), url or server.stderr.read()
        asked = ["query", "--server", url, "--samples", "0-2", "-k", "4", "--format", "jsonl"]
        result = _run([asked, ["self-influence", "--server", url, "--top", "3", "--format", "jsonl"]])
        assert result["exits"] == [0, 0] and result["loaded"] == []
        direct = CliRunner().invoke(cli, ["query", built, "--samples", "0-2", "-k", "4", "--format", "jsonl"])
        assert result["output"].startswith(direct.output) and len(direct.output.splitlines()) == 12
        probe = (
            "import sys, json, gradindex; table = gradindex.connect(sys.argv[1]).query([0, 1], k=3); "
            "print(json.dumps({'rows': table.num_rows, 'loaded': [m for m in json.loads(sys.argv[2]) "
            "if m in sys.modules]}))"
        )
        done = subprocess.run(
            [sys.executable, "-c", probe, url, json.dumps(HEAVY)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout) == {"rows": 6, "loaded": []}
    finally:
        server.terminate()
        assert server.wait(30) == 0
