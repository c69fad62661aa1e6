"""Small stores written shard by shard through ``GradientStore.write_shard`` (no model), for the tests of reading:
the budgeted search's and the read check's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from gradindex.store import GradientStore, StoreLayout, create_store, open_store, write_manifest


def written_store(
    path: Path,
    features: np.ndarray,
    rows_per_shard: int,
    rows_per_chunk: int,
    dtype: str = "float16",
    *,
    skipped: tuple[int, ...] = (),
    finalize: bool = True,
) -> GradientStore:
    """A store of ``features`` (rows ``skipped`` zeroed and listed as skipped), each row's self-influence its squared
    norm and its sample id ``s<row>``; finalized unless asked not to."""
    n_samples, dim = features.shape
    layout = StoreLayout(
        n_samples=n_samples, dim=dim, dtype=dtype, rows_per_shard=rows_per_shard, rows_per_chunk=rows_per_chunk
    )
    store = create_store(path, layout, {"method": "test"})
    features = features.copy()
    features[list(skipped)] = 0
    for shard in range(store.n_shards):
        start, stop = layout.shard_rows(shard)
        store.claim_shard(shard, owner="test")
        block = features[start:stop]
        samples = pa.table({"row": np.arange(start, stop), "sample_id": [f"s{row}" for row in range(start, stop)]})
        mine = [row for row in skipped if start <= row < stop]
        store.write_shard(
            shard,
            block,
            (block.astype(np.float64) ** 2).sum(1).astype(np.float32),
            samples,
            nonfinite={"skipped": mine} if mine else None,
        )
    if finalize:
        assert store.finalize()
    return open_store(path)


def as_made_before_read_check(path: Path) -> None:
    """What a gradindex without the read check wrote: no read_check, no crc32c or seal in the records."""
    manifest = dict(open_store(path).manifest)
    del manifest["read_check"]
    manifest["shards"] = [
        {key: value for key, value in record.items() if key not in ("crc32c", "record_sha256")}
        for record in manifest["shards"]
    ]
    write_manifest(path, manifest)
