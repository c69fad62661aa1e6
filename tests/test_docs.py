"""Documentation and conventions: the generated CLI reference is current, the README documents what
the CLI does (exit codes, --format json, NO_COLOR, progress), and the library never prints."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
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


def test_readme_keeps_its_setup_commands_first():
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    assert lines[2] == "```bash"
    assert lines[3].startswith("pip install torch==2.13.0 && pip install -e . && gradindex demo")
    assert lines[4].startswith('pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q')


# ---- the documentation site ----------------------------------------------------------------------

DOCS = ROOT / "docs"
GENERATED = {"cli.md"}  # written by `python -m gradindex.cli.docs`, never by hand


def _nav_pages(entry) -> list[str]:
    """The pages a mkdocs nav entry names, in order: a page, a {title: page or list} mapping, or a list."""
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, dict):
        return [page for value in entry.values() for page in _nav_pages(value)]
    if isinstance(entry, list):
        return [page for item in entry for page in _nav_pages(item)]
    raise AssertionError(f"unexpected nav entry in mkdocs.yml: {entry!r}")


def _mkdocs_config() -> dict:
    import yaml  # mkdocs's own dependency (and dask's)

    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def _page(name: str) -> str:
    return (DOCS / name).read_text()


def test_readme_is_short_and_links_to_docs_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) < 8000, f"the README is {len(readme)} characters; move reference material into docs/"
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [target.split("#")[0] for target in targets if "://" not in target and not target.startswith("#")]
    assert local, "the README links to no docs page"
    for target in local:
        assert (ROOT / target).exists(), f"the README links to {target}, which does not exist"
    for page in _nav_pages(_mkdocs_config()["nav"]):
        assert f"docs/{page}" in local, f"the README does not link to docs/{page}"


def test_every_docs_page_is_in_the_nav_and_every_nav_page_exists():
    config = _mkdocs_config()
    assert config["site_name"] == "gradindex" and config["docs_dir"] == "docs"
    pages = _nav_pages(config["nav"])
    assert len(pages) == len(set(pages)), f"a page is listed twice in the nav: {pages}"
    for page in pages:
        assert (DOCS / page).is_file(), f"mkdocs.yml lists {page}, which is not in docs/"
    on_disk = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert on_disk - set(pages) == set(), f"pages missing from mkdocs.yml's nav: {sorted(on_disk - set(pages))}"


def test_the_exit_codes_are_documented():
    scripting = _page("scripting.md")
    for code, meaning in (("0", "success"), ("1", "error"), ("2", "usage")):
        assert re.search(rf"`{code}`\s*\|\s*{meaning}", scripting), f"exit code {code} is not documented"


def test_every_method_is_documented():
    from gradindex.methods import METHODS

    methods = _page("methods.md")
    for method in {"tracin", "gex", "if", "arnoldi", "trak"} | set(METHODS):
        assert f"`{method}`" in methods, f"method {method} is missing from docs/methods.md"


def test_every_example_script_is_documented():
    examples = _page("examples.md")
    scripts = sorted((ROOT / "examples").glob("*.py"))
    assert scripts
    for script in scripts:
        assert f"examples/{script.name}" in examples, script.name


def test_the_docs_say_how_to_regenerate_the_cli_reference():
    written = [path for path in sorted(DOCS.glob("*.md")) if path.name not in GENERATED]
    telling = [path.name for path in written if REGENERATE in path.read_text() and "docs/cli.md" in path.read_text()]
    assert telling, f"no hand-written docs page names docs/cli.md and `{REGENERATE}`"


def test_the_docs_site_builds_strictly(tmp_path):
    missing = [name for name in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python") if not _importable(name)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed; pip install -e '.[docs]' to build the site")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    for page in _nav_pages(_mkdocs_config()["nav"]):
        assert (site / page.removesuffix(".md").replace("index", "") / "index.html").is_file(), page
    api = next(site.rglob("api/index.html")).read_text()
    for name in gradindex.__all__:
        if name == "__version__":
            continue
        assert f'id="gradindex.{name}"' in api or f'id="gradindex.errors.{name}"' in api, (
            f"gradindex.{name} is not in the API reference (docs/api.md)"
        )


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


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
    streamed = gradindex.search.least_memory_budget(store, 2, 2)
    gradindex.query(store, samples=[0, 1], k=2, progress=True, memory_budget=streamed)  # a bar over the store's rows
    shown = capsys.readouterr().err
    assert "featurize queries" in shown and "search p.gradindex" in shown and "row/s" in shown
    gradindex.build(MLP, mlp_checkpoints, tmp_path / "q.gradindex", proj_dim=16, progress=False)
    gradindex.query(store, samples=[0], k=2, progress=False)
    assert capsys.readouterr().err == ""
    # the CLI's --quiet reaches the library
    result = CliRunner().invoke(
        cli, ["-q", "query", str(store.path), "--samples", "0", "-k", "1", "--memory-budget", str(streamed)]
    )
    assert result.exit_code == 0 and "row/s" not in result.stderr and "sample/s" not in result.stderr


# ---- docstrings ----------------------------------------------------------------------------------------------------

ENTRY_POINTS = (
    "build", "query", "self_influence", "search_store", "build_index", "curate", "report", "make_ensemble", "Task",
    "info", "verify", "finalize", "list_indexes", "drop_index", "open_store", "load_task",
)  # fmt: skip


def _documented(docstring: str) -> set[str]:
    """The parameter names of a Google-style ``Args:`` section (``name:`` and ``**name:`` lines)."""
    section = docstring.split("Args:", 1)[1] if "Args:" in docstring else ""
    section = re.split(r"\n\s*(Returns|Raises|Yields|Example|Examples):", section)[0]
    return set(re.findall(r"^\s{4,8}\**(\w+):", section, flags=re.M))


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_public_entry_point_documents_each_parameter(name):
    import inspect

    entry = getattr(gradindex, name)
    parameters = [p for p in inspect.signature(entry).parameters if p not in ("self",)]
    documented = _documented(inspect.getdoc(entry) or "")
    missing = [p for p in parameters if p not in documented]
    assert not missing, f"gradindex.{name} does not document {missing} in its Args: section"
    assert not documented - set(parameters), f"gradindex.{name} documents parameters it does not have"


def test_the_docstring_check_reads_an_args_section():
    text = "Summary.\n\nArgs:\n    a: one.\n    **b: two,\n        continued.\n\nReturns:\n    x: not a parameter.\n"
    assert _documented(text) == {"a", "b"}
