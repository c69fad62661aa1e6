"""``python -m benchmarks.serve --tiny`` runs inside the suite so that it cannot rot; no timing assertions."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import serve


def test_serve_benchmark_times_both_ways_and_their_answers_are_equal():
    payload = serve.run(tiny=True)
    assert payload["answers_equal"] is True and payload["server_exit_code"] == 0
    assert payload["server_search"] == "exact in memory"
    assert [len(payload["direct_rounds_s"]), len(payload["served_rounds_s"])] == [1, 1]
    assert len(payload["rows"]) == 3 and all(row["best_s"] > 0 for row in payload["rows"])
