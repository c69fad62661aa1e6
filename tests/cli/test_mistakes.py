"""The mistake matrix (``mistakes.py``) through the command line: one sentence, the right exit code, no traceback."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner
from reliability import mistakes

from gradindex.cli import cli


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return mistakes.make_world(tmp_path_factory.mktemp("mistakes"))


def test_every_mistake_is_one_sentence_without_a_traceback(world, capsys):
    figures, failures = mistakes.run(world)
    with capsys.disabled():
        print(
            f"\nmistake matrix: {figures['mistakes']} mistakes, {figures['answered in one sentence']} answered in one "
            f"sentence, tracebacks {figures['tracebacks']}"
        )
    assert figures["mistakes"] >= 30
    assert not failures, "\n".join(failures)


def test_nothing_the_mistakes_touched_changed_the_store(world):
    before = {path: os.path.getmtime(path) for path in map(str, sorted((world["root"] / "s.gradindex").rglob("*")))}
    CliRunner().invoke(
        cli, ["build", "--task", mistakes.MLP, "--checkpoint", world["checkpoints"][0], "-o", world["store"]]
    )
    after = {path: os.path.getmtime(path) for path in map(str, sorted((world["root"] / "s.gradindex").rglob("*")))}
    assert before == after
    assert (world["root"] / "notes.txt").read_text() == "my notes\n"
