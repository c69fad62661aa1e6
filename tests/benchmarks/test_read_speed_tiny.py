"""``python -m benchmarks.read_speed --tiny`` runs inside the suite so that it cannot rot; no timing assertions."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import read_speed


def test_read_speed_measures_startup_reads_and_queries_side_by_side():
    payload = read_speed.run(tiny=True)
    assert payload["reads_equal_raw_zarr"] is True
    assert [row["command"] for row in payload["startup"]] == [
        'python -c "import torch"',
        "gradindex --help",
        "gradindex info STORE",
        "gradindex verify STORE",
    ]
    assert {row["read"].split(",")[0] for row in payload["reads"]} >= {
        "raw zarr read",
        "gradindex verified read",
    }
    assert len(payload["queries"]) == 3 and all(row["cpu_s"] > 0 for row in payload["queries"])
    assert min(row["cpu_vs_plain_faiss"] for row in payload["queries"][1:]) == 1.0
