"""The scale benchmark in tiny mode, so that it cannot rot (no timing assertions)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import scale


def test_scale_benchmark_tiny():
    payload = scale.run(tiny=True)
    # exact streamed search is correct: every planted row first, top-10 equal to numpy float64 brute force
    assert payload["planted_rows_ranked_first"] is True
    assert payload["equal_to_brute_force"] is True
    assert payload["streamed_equal_in_memory"] is True
    assert payload["store_bytes"] > payload["memory_budget_bytes"]  # the store is streamed
    ivf_curve = payload["ivf"]["curve"]
    assert [point["param"] for point in ivf_curve] == sorted(point["param"] for point in ivf_curve)
    assert all(0 <= point["recall_at_10"] <= 1 and point["queries_per_s"] > 0 for point in ivf_curve)
    assert ivf_curve[-1]["recall_at_10"] >= ivf_curve[0]["recall_at_10"]
    assert set(payload["sub_store"]["curves"]) and payload["plotted"] is True


def test_scale_distributed_benchmark_tiny():
    pytest.importorskip("distributed")
    payload = scale.run_distributed(tiny=True)
    for run in payload["runs"].values():
        assert run["planted_rows_ranked_first_exact"] is True
        assert set(run["directions"]) == {"proponents", "opponents"}
        for point in run["directions"].values():
            assert 0 <= point["recall_at_10"] <= 1 and point["nprobe"] >= 1 and point["queries_per_s"] > 0
        lost = run["lost_worker"]
        assert lost["same_answer"] is True and lost["exact_same_answer"] is True and lost["parts_replaced"] >= 1
