"""``python -m benchmarks.metadata_scale --tiny`` (200 shards on local disk and on S3 through moto) runs inside the
suite so that it cannot rot: every simulated shard is written, listed, finalized and opened through the store's own
functions; no timing assertions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from benchmarks import metadata_scale


def test_metadata_paths_of_200_shards_on_disk_and_on_s3(tmp_path):
    payload = metadata_scale.run(tiny=True, work=tmp_path)
    assert [(record["location"], record["shards"]) for record in payload["records"]] == [("local", 200), ("s3", 200)]
    for record in payload["records"]:
        assert record["measured"] is True
        assert record["manifest_bytes"] > 200 * 300  # every record lives in the complete manifest
        assert all(record[f"{name}_ms_per_1000"] > 0 for name in ("claim", "write", "list", "finalize", "open"))
