"""``python -m benchmarks.memory_budget --tiny`` runs inside the suite so that it cannot rot: the streamed answers equal
the in-memory ones at each budget, in blocks smaller than a shard; no memory or timing assertions (the peak belongs
in the benchmark)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import memory_budget


def test_memory_budget_streams_pieces_with_the_in_memory_answers(tmp_path):
    payload = memory_budget.run(tiny=True, work=tmp_path)
    queries = [record for record in payload["records"] if record["what"] == "query"]
    assert [record["memory_budget_bytes"] for record in queries] == [4352 << 10, 4608 << 10, None]
    assert all(record["equals_in_memory"] for record in queries)
    assert all(0 < record["block_rows"] < payload["store"]["rows_per_shard"] for record in queries[:2])
    assert [record.get("top") for record in payload["records"] if record["what"] == "self-influence"] == [100, None]
