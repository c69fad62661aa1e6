"""The GEX-regime side study's smoke run (``python -m benchmarks.quality --only gex-regime --fast``): a tiny MLP that
fits its flipped labels, GEX's members made through the command line, every method ranked; GEX, with the library's
defaults, at least as good as the training loss, and the path issue 17 measured warned about twice."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

pytest.importorskip("sklearn")

from benchmarks.quality import _gex_regime


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    return _gex_regime.run(fast=True, seeds=[0], workdir=tmp_path_factory.mktemp("gex-regime"))


def test_every_method_is_ranked_and_gex_matches_the_training_loss(payload):
    summary = {row["method"]: row for row in payload["summary"]}
    assert set(summary) == set(_gex_regime.METHODS)
    fit = next(r for r in payload["records"] if r["method"] == "train-loss")
    assert fit["train_accuracy"] == 1.0  # the model fits every noisy label
    assert summary["gex"]["auc"] >= summary["train-loss"]["auc"]  # measured 1.000 against 0.981
    assert summary["gex (before)"]["auc"] < 0.5  # measured 0.021: τ = 0.05 turns the ranking upside down
    gex = next(r for r in payload["records"] if r["method"] == "gex")
    assert gex["warnings"] == [] and gex["distance"][0] > 0.1


def test_the_degenerate_path_is_warned_about(payload):
    before = next(r for r in payload["records"] if r["method"] == "gex (before)")
    assert any("stayed within" in text and "--weight-decay" in text for text in before["warnings"])
    assert any("dominated by tau=0.05" in text and "--tau 0" in text for text in before["warnings"])


def test_the_markdown_names_the_recipe_and_every_method(payload):
    text = _gex_regime.markdown(payload)
    assert "gradindex ensemble --members 2 --steps 60 --lr 0.05" in text
    for method in _gex_regime.METHODS:
        assert f"| {method} |" in text
