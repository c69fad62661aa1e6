"""The method options on the command line: build, query and self-influence, and their one-sentence errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from methods import closed_form_logreg

from gradindex.cli import cli


@pytest.fixture(scope="module")
def logreg(tmp_path_factory):
    return closed_form_logreg.make(tmp_path_factory.mktemp("cli-logreg"), l2=0.1)


def _scores(output: str, n_queries: int, n_rows: int) -> np.ndarray:
    scores = np.full((n_queries, n_rows), np.nan)
    for line in output.strip().splitlines():
        row = json.loads(line)
        scores[row["query"], row["row"]] = row["score"]
    return scores


def test_if_build_query_and_self_influence_options(logreg, tmp_path):
    runner = CliRunner()
    store = tmp_path / "if.gradindex"
    task_spec = f"{closed_form_logreg.__file__}:task_l2_0_1"  # the task the closed form is fitted for (l2 = 0.1)
    built = runner.invoke(
        cli,
        [
            "build",
            "--task",
            task_spec,
            "--checkpoint",
            logreg.checkpoint,
            "-o",
            str(store),
            "--method",
            "if",
            "--solver",
            "exact",
            "--damping",
            "0.01",
            "--projection",
            "none",
            "--dtype",
            "float32",
            "--method-option",
            "cg_tol=1e-8",
        ],
    )
    assert built.exit_code == 0, built.output
    n_rows = logreg.n_train
    queried = runner.invoke(
        cli,
        [
            "query",
            str(store),
            "--samples",
            "0,1",
            "-k",
            str(n_rows),
            "--damping",
            "0.05",
            "--solver",
            "cg",
            "--format",
            "jsonl",
        ],
    )
    assert queried.exit_code == 0, queried.output
    expected = logreg.influence(0.05, [0, 1])
    np.testing.assert_allclose(
        _scores(queried.output, 2, n_rows), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max()
    )
    ranked = runner.invoke(cli, ["self-influence", str(store), "--damping", "0.05", "--top", "3", "--format", "jsonl"])
    assert ranked.exit_code == 0, ranked.output
    top = [json.loads(line) for line in ranked.output.strip().splitlines()]
    expected_self = logreg.self_influence(0.05)
    assert [row["row"] for row in top] == list(np.argsort(-expected_self)[:3])
    np.testing.assert_allclose([row["score"] for row in top], np.sort(expected_self)[::-1][:3], rtol=1e-4)


def test_method_option_mistakes_are_one_sentence(logreg, tmp_path):
    runner = CliRunner()
    base = ["build", "--task", "breast-cancer", "--checkpoint", logreg.checkpoint]
    wrong = runner.invoke(cli, [*base, "-o", str(tmp_path / "a.gradindex"), "--rank", "5"])
    assert wrong.exit_code == 1
    assert "option rank does not apply to --method tracin; it belongs to --method arnoldi" in wrong.output
    assert "Traceback" not in wrong.output
    bad = runner.invoke(
        cli, [*base, "-o", str(tmp_path / "b.gradindex"), "--method", "if", "--method-option", "cg_tol"]
    )
    assert bad.exit_code == 2 and "must look like KEY=VALUE" in bad.output
    tracin = runner.invoke(cli, [*base, "-o", str(tmp_path / "t.gradindex"), "--proj-dim", "8"])
    assert tracin.exit_code == 0, tracin.output
    damped = runner.invoke(cli, ["query", str(tmp_path / "t.gradindex"), "--samples", "0", "--damping", "0.1"])
    assert (
        damped.exit_code == 1 and "damping applies to stores built with --method if / arnoldi / trak" in damped.output
    )


@pytest.mark.parametrize("method", ["trak", "if"])
def test_kron_projection_is_refused_before_any_work(logreg, tmp_path, method):
    store = tmp_path / f"{method}.gradindex"
    result = CliRunner().invoke(
        cli,
        [
            "build",
            "--task",
            "breast-cancer",
            "--checkpoint",
            logreg.checkpoint,
            "-o",
            str(store),
            "--method",
            method,
            "--projection",
            "kron",
        ],
    )
    assert result.exit_code == 1
    assert (
        f"--projection kron is not available for --method {method} yet; use rademacher, gaussian, sjlt or none"
        in result.output
    )
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not store.exists()  # refused before the store was created
