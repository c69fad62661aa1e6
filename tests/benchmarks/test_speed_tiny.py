"""``python -m benchmarks.speed --tiny`` runs inside the suite so it cannot rot; no timing assertions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.speed import _run

PEERS = {"captum": "Captum", "trak": "TRAK", "dattri": "dattri"}


def test_speed_benchmark_tiny_runs_every_method_side_by_side():
    payload = _run.run(tiny=True, write=False, log=lambda message: None)
    rows = payload["featurization"]
    assert {row["model"] for row in rows} == {"mlp", "cnn", "transformer", "transformer-uniform"}
    # the uniform-token control: gradindex's own projections and the training step only
    assert {row["method"] for row in rows if row["model"] == "transformer-uniform"} == {
        "training step (SGD, reference)",
        "gradindex kron",
        "gradindex kron (orthogonal sides)",
        "gradindex sjlt",
    }
    for model in ("mlp", "cnn", "transformer"):
        mine = {row["method"]: row for row in rows if row["model"] == model}
        for method in (
            "gradindex kron",
            "gradindex kron (orthogonal sides)",
            "gradindex sjlt",
            "training step (SGD, reference)",
        ):
            assert mine[method]["samples_per_s"] > 0, (model, method, mine[method])
        kron = mine["gradindex kron"]
        assert -1 <= kron["spearman"] <= 1 and kron["x_training_step"] > 0
        # the peer comparison counts only peers at least as accurate (flattened Spearman), or says there is none
        at_quality = [
            row
            for row in mine.values()
            if row.get("spearman") is not None
            and row["spearman"] >= kron["spearman"]
            and not row["method"].startswith(("gradindex", "training"))
        ]
        if at_quality:
            best = max(at_quality, key=lambda row: row["samples_per_s"])
            assert kron["fastest_peer_at_quality"] == best["method"]
            assert abs(kron["x_fastest_peer_at_quality"] - kron["samples_per_s"] / best["samples_per_s"]) < 1e-9
        elif any(
            row.get("samples_per_s") and not row["method"].startswith(("gradindex", "training"))
            for row in mine.values()
        ):
            assert kron["fastest_peer_at_quality"] == "none as accurate"
        else:  # no peer ran (they are the bench extra's, not installed): the table says so
            assert kron["fastest_peer_at_quality"] == "no peer ran"
    # a peer either ran (with a rate and a Spearman) or says why not; one that is not installed is skipped, not faked
    for module, label in PEERS.items():
        peer_rows = [row for row in rows if label in row["method"] or row["method"].startswith(module)]
        assert peer_rows, label
        if importlib.util.find_spec(module if module != "trak" else "trak") is None:
            assert all(row.get("status") == "not run" and "not installed" in row["note"] for row in peer_rows)
        for row in peer_rows:
            assert row.get("samples_per_s", 0) > 0 or row.get("status") in ("not run", "failed"), row
            if row.get("status"):
                assert row["note"], row
    # Bergson runs through its hook collector where it imports, else says why not
    bergson = [row for row in rows if row["method"].startswith(("Bergson", "bergson"))]
    assert len(bergson) == 3
    if importlib.util.find_spec("bergson") is None:
        assert all(row["status"] == "not run" and "cannot be imported" in row["note"] for row in bergson)
    else:
        assert all(row["samples_per_s"] > 0 and -1 <= row["spearman"] <= 1 for row in bergson), bergson
    query = payload["query"]
    methods = {row["method"] for row in query}
    assert "torch GEMM + topk (roofline)" in methods and "gradindex ExactIndex (in memory)" in methods
    assert all(row["seconds"] > 0 for row in query)
