"""The digits demo at small settings: self-influence printed beside the final training loss (and at least as good),
cosine proponents from a unit-normalized store, and its arguments checked."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

import gradindex
from gradindex.apps import run_demo


@pytest.fixture(scope="module")
def digits_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits-demo")
    lines: list[str] = []
    threads = torch.get_num_threads()
    results = run_demo(root, epochs=60, hidden=128, n_checkpoints=4, proj_dim=64, echo=lines.append, progress=False)
    assert torch.get_num_threads() == threads  # the demo's one thread is given back
    return {"root": root, "lines": lines, "results": results}


def test_the_digits_demo_prints_self_influence_beside_the_final_training_loss(digits_demo):
    """The printed table is the returned figures, and self-influence (TracIn-CP over the trajectory) is at least as
    good as the final training loss it is printed beside."""
    results, lines = digits_demo["results"], digits_demo["lines"]
    for name, key in (("self-influence (TracIn-CP)", "self_influence"), ("final training loss", "training_loss")):
        (row,) = [line for line in lines if line.startswith(f"  {name} ")]
        assert row.split()[-4:-2] == [f"{results[key]['auc']:.3f}", f"{results[key]['ap']:.3f}"]
    assert results["self_influence"]["auc"] >= results["training_loss"]["auc"] > results["random"]["auc"]
    assert any(line.startswith("  self-influence beats the final training loss") for line in lines)
    saved = json.loads((digits_demo["root"] / "results.json").read_text())
    assert saved["self_influence"] == results["self_influence"] and saved["fitted_fraction"] > 0.8


def test_the_digits_demo_shows_cosine_proponents(digits_demo):
    """Proponents come from the unit-normalized store: every score is a learning-rate-weighted sum of cosines, and
    fewer of them are flipped samples than by raw gradient products (which favour the largest gradients)."""
    root, results = digits_demo["root"], digits_demo["results"]
    raw, cosine = (
        gradindex.open_store(root / "digits.gradindex"),
        gradindex.open_store(root / "digits-cosine.gradindex"),
    )
    assert not raw.fingerprint["method"]["normalize"] and cosine.fingerprint["method"]["normalize"]
    bound = sum(item["weight"] for item in cosine.fingerprint["checkpoints"])
    proponents = pq.read_table(root / "proponents.parquet")
    scores = proponents.column("score").to_numpy()
    assert proponents.num_rows == 9 and (abs(scores) <= bound * (1 + 1e-3)).all()
    flipped = results["proponents_flipped"]
    assert flipped["cosine"] < flipped["raw"]
    shown = [line for line in digits_demo["lines"] if line.startswith(("    + row", "    - row"))]
    assert len(shown) == 6


def test_the_digits_demo_needs_a_trajectory(tmp_path):
    with pytest.raises(gradindex.ArgumentError, match="2 <= n_checkpoints <= epochs"):
        run_demo(tmp_path, n_checkpoints=1, echo=lambda line: None)
