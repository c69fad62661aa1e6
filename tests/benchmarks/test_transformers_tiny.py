"""``python -m benchmarks.transformers --tiny`` runs inside the suite so it cannot rot: every family and projection
reports, and the unprojected store reproduces exact TracIn-CP computed independently (autograd, one sample at a
time, the model transformers loads from each ``save_pretrained`` folder). No timing assertions."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

pytest.importorskip("transformers")
pytest.importorskip("scipy")

from benchmarks.transformers import _run
from benchmarks.transformers._workloads import FAMILIES


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    return _run.run("tiny", write=False, workdir=tmp_path_factory.mktemp("transformers"), log=lambda message: None)


def test_every_family_and_projection_reports(payload):
    assert [model["model"] for model in payload["models"]] == list(FAMILIES)
    for model in payload["models"]:
        assert model["parameters"] > 0 and model["checkpoints"] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    rows = {(row["model"], row["projection"]): row for row in payload["fidelity"]}
    assert len(rows) == len(FAMILIES) * len(_run.PROJECTIONS)
    for family in FAMILIES:
        parameters = next(model["parameters"] for model in payload["models"] if model["model"] == family)
        kron, sjlt, none = (rows[(family, _run.LABELS[name])] for name in ("kron", "sjlt", "none"))
        assert kron["k"] <= 64 and sjlt["k"] == 64 and none["k"] == parameters  # per checkpoint
        assert "factored" in kron["plan"] or "pca" in kron["plan"] or "exact" in kron["plan"], kron["plan"]
        for row in (kron, sjlt, none):
            per_query = np.array(row["per_query_spearman"])
            assert len(per_query) == 4 and np.all(np.isfinite(per_query)) and np.all(np.abs(per_query) <= 1)
            assert row["mean_spearman"] == pytest.approx(per_query.mean())
            assert row["min_spearman"] == pytest.approx(per_query.min())


def test_the_unprojected_store_is_exact_tracin(payload):
    """At the full gradient dimension the scores are exact TracIn-CP: the benchmark's reference and gradindex's
    unprojected per-sample gradients (tied weights summed over their uses, padded batches) agree."""
    for row in payload["fidelity"]:
        if row["projection"] == _run.LABELS["none"]:
            assert row["min_spearman"] > 0.999, row
            assert row["score_relative_error"] < 1e-4, row


def test_build_speed_and_reading(payload):
    (speed,) = payload["build_speed"]
    assert speed["n_train"] == 24 and speed["build_s"] > 0 and speed["epoch_s"] > 0
    assert speed["ratio"] == pytest.approx(speed["build_s"] / speed["epoch_s"])
    assert 0 < speed["calibration_s"] < speed["build_s"]
    reading = payload["reading"]
    assert "kron gpt2 " in reading and ", bert " in reading and "llama (" in reading and "24 rows " in reading
    verdict = "met" if speed["ratio"] <= _run.SPEED_TARGET else "missed"
    assert f"= {speed['ratio']:.2f}x, {verdict} (" in reading


def test_the_section_renders(payload):
    text = _run._markdown(payload)
    assert text.startswith("## Transformers") and "| model | parameters | n_train | projection |" in text
    assert "| n_train | build_s | epoch_s | ratio |" in text and payload["reading"] in text
