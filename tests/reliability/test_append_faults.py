"""An append cannot rot a store's history, and overwrite=True replaces only a gradindex store.

``build(append=True)`` checks every old row (its sample id, and its shard's content hash) before it writes
anything, stages what it writes under ``_append/`` and shows it by one manifest swap: killed or failed at any step,
the store is complete, answers as before and, after the orphan sweep, is byte-identical to before (or, past the swap,
to a fresh build of the grown rows); run again, the append completes it equal to a fresh build. The sweeps live in
``appends.py``."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from reliability import appends, harness

import gradindex
from gradindex.cli import cli

RANDOM_KILLS = 3


@pytest.fixture(scope="module")
def checkpoints(env):
    return env.checkpoints


def test_an_append_killed_at_every_step(env, capsys):
    result = appends.append_kill_sweep(env.fresh("append-kill"), env.checkpoints, n_random=RANDOM_KILLS, seed=7)
    figures = result["figures"]
    sites = len(appends.APPEND_SITES)
    harness.report(
        capsys,
        harness.summary(
            f"append kill sweep ({sites} crash points + {RANDOM_KILLS} random SIGKILLs, 1050 -> 1300 rows)",
            figures,
            [
                "tried",
                "killed",
                "complete",
                "queries as before",
                "queries as grown",
                "byte-identical after the sweep",
                "reruns equal a fresh build",
                "staged shard files kept by the rerun",
                "orphans",
            ],
        ),
    )
    assert result["failures"] == []
    tried = sites + RANDOM_KILLS
    assert figures["tried"] == figures["complete"] == tried
    # every crash point stops its child; a random SIGKILL may land after a fast child has finished (no timing is
    # assumed), and the store must then simply be the grown one
    assert sites <= figures["killed"] <= tried
    assert figures["queries as before"] >= appends.FIRST_AFTER_SWAP
    assert figures["queries as before"] + figures["queries as grown"] == tried
    assert figures["byte-identical after the sweep"] == figures["reruns equal a fresh build"] == tried
    assert figures["staged shard files kept by the rerun"] > 0  # a rerun continues what a stopped append staged
    assert figures.get("orphans", 0) == 0


def test_an_append_failing_at_every_disk_step(env, capsys):
    result = appends.append_io_error_sweep(env.fresh("append-io"), env.checkpoints, every=3)
    figures = result["figures"]
    harness.report(
        capsys,
        harness.summary(
            f"append I/O errors (EIO at every 3rd of {result['steps']} disk steps)",
            figures,
            [
                "injected",
                "typed errors",
                "completed anyway",
                "queries as before",
                "queries as grown",
                "byte-identical after the sweep",
                "reruns equal a fresh build",
                "orphans",
            ],
        ),
    )
    assert result["failures"] == []
    assert figures["typed errors"] + figures.get("completed anyway", 0) == figures["injected"]
    assert figures["byte-identical after the sweep"] == figures["reruns equal a fresh build"] == figures["injected"]


def test_a_changed_history_is_refused_before_any_write(env, capsys):
    result = appends.history_refusals(env.fresh("append-history"), env.checkpoints)
    figures = result["figures"]
    harness.report(
        capsys,
        harness.summary(
            "append over a changed history (a sample, the order, id values, id types)",
            figures,
            ["tried", "refused, naming the row", "byte-identical"],
        ),
    )
    assert result["failures"] == []
    assert figures["tried"] == figures["refused, naming the row"] == figures["byte-identical"] == 5


def test_readers_during_an_append_see_the_old_store_then_the_grown_one(env, capsys):
    result = appends.append_reader_run(env.fresh("append-read"), env.checkpoints)
    figures = result["figures"]
    harness.report(
        capsys,
        harness.summary(
            "readers during an append",
            figures,
            [
                "polls",
                "saw the old store",
                "saw the grown store",
                "errors",
                "wrong answers",
                "held readers",
                "held readers answering as before",
            ],
        ),
    )
    assert result["problems"] == []
    assert figures["appended"] == 1 and figures["saw the old store"] > 0
    assert figures.get("errors", 0) == figures.get("wrong answers", 0) == 0
    assert figures["held readers answering as before"] == figures["held readers"]
    assert figures["grown store equals a fresh build"] == figures["grown store answers as a fresh build"] == 1


def test_overwrite_replaces_only_a_store(env, capsys):
    result = appends.overwrite_refusals(env.fresh("overwrite"), env.checkpoints)
    figures = result["figures"]
    harness.report(
        capsys,
        harness.summary(
            "overwrite=True over what is not a store (file, folder, links, Zarr group; local and memory://)",
            figures,
            ["tried", "refused, naming it", "left intact", "stores tried", "stores replaced"],
        ),
    )
    assert result["failures"] == []
    assert figures["tried"] == figures["refused, naming it"] == figures["left intact"] == 8
    assert figures["stores tried"] == figures["stores replaced"] == 4


def test_the_cli_refuses_in_one_line(env, capsys):
    root = env.fresh("append-cli")
    store = gradindex.build(appends.OLD, env.checkpoints, root / "s.gradindex", **appends.OPTIONS).path
    (root / "notes.txt").write_text("not a store")
    (root / "photos").mkdir()
    (root / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    (root / "link").symlink_to(store)
    build = ["build", "--checkpoint", env.checkpoints[0], "--projection", "none", "--rows-per-shard", "100"]
    cases = {
        "a changed sample": (
            [*build, "--task", f"{harness.TASKS}:append_changed_sample_task", "-o", str(store), "--append"],
            "shard 5",
        ),
        "ids of another type": (
            [*build, "--task", f"{harness.TASKS}:append_string_ids_task", "-o", str(store), "--append"],
            "--overwrite",
        ),
        "overwriting a regular file": (
            [*build, "--task", appends.OLD, "-o", str(root / "notes.txt"), "--overwrite"],
            "",
        ),
        "overwriting a folder": ([*build, "--task", appends.OLD, "-o", str(root / "photos"), "--overwrite"], ""),
        "overwriting a link": ([*build, "--task", appends.OLD, "-o", str(root / "link"), "--overwrite"], ""),
    }
    before = harness.tree_hash(root)
    answered = 0
    for name, (arguments, words) in cases.items():
        result = CliRunner().invoke(cli, arguments)
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert result.exit_code == 1, (name, result.output)
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, name
        assert words in lines[0] and "=True" not in lines[0], (name, lines[0])
        answered += 1
    assert harness.tree_hash(root) == before
    harness.report(capsys, f"append/overwrite refusals on the command line: {answered}/{len(cases)} exit 1 in one line")
