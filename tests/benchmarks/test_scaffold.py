"""The build and query benchmarks run in tiny mode, so they cannot rot (no timing assertions)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import build_throughput, query_throughput


def test_build_throughput_tiny():
    payload = build_throughput.run(tiny=True)
    (row,) = payload["rows"]
    assert row["samples"] == 64 and row["k"] == 1024 and row["samples_per_s"] > 0


def test_query_throughput_tiny():
    payload = query_throughput.run(tiny=True)
    assert payload["equal_to_brute_force"] is True
    assert len(payload["rows"]) == 4
