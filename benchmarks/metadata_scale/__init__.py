"""The metadata paths of a build and a query at many shards, without computing a gradient: what 10^5 shards cost.

    python -m benchmarks.metadata_scale --shards 100000 [--moto-shards 3000] [--tiny]

Each simulated shard goes through the store's own functions the way a build worker does (``claim_shard``,
``write_shard`` with tiny features, self-influence, a sample table and a content hash, which releases the claim), then
the store is listed (``done_shards``: what ``--resume`` and ``progress`` do), finalized (``finalize``: every record and
sample part read back and checked, ``samples.parquet`` and the manifest written) and opened (``open_store``: the
manifest, with every record in it, read and checked against its seal), and every record is checked as a query's
reads check it (``shard_record``). On local disk at 10^3 shards (every write fsynced: the disk's latency); in RAM
(``/dev/shm``, where fsync costs nothing: the metadata's own CPU cost) at 10^4 and ``--shards``; on S3 (moto's server
on loopback) at 10^3 and ``--moto-shards`` (default 3,000: moto answers a request in 5-10 ms here). At ``--shards``
on S3 only the manifest open and the record checks are measured (the complete store's metadata uploaded); writing,
listing and finalizing are extrapolated linearly from the two S3 sizes, labelled as such. Costs are reported per
1,000 shards. Writes results/metadata_scale.json and the ``metadata_scale`` section of RESULTS.md.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from benchmarks._report import machine, markdown_table, save_json, update_section

ROWS_PER_SHARD, DIM = 2, 4
_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


def _tiny_shard(start: int, stop: int):
    import pyarrow as pa

    samples = pa.table({"row": np.arange(start, stop), "sample_id": [f"s{row}" for row in range(start, stop)]})
    return np.zeros((stop - start, DIM), np.float32), np.zeros(stop - start, np.float32), samples


def simulate(location: str, n_shards: int, *, storage_options: dict | None = None) -> dict:
    """Write, list, finalize, open and check a store of ``n_shards`` tiny shards at ``location``; seconds of each."""
    from gradindex.store import StoreLayout, create_store
    from gradindex.utils import sha256_bytes

    layout = StoreLayout(
        n_samples=n_shards * ROWS_PER_SHARD, dim=DIM, dtype="float16", rows_per_shard=ROWS_PER_SHARD,
        rows_per_chunk=ROWS_PER_SHARD,
    )  # fmt: skip
    result: dict = {"location": location.split("://")[0] if "://" in location else "local", "shards": n_shards}
    started = time.perf_counter()
    store = create_store(location, layout, {"method": "metadata-scale"}, storage_options=storage_options)
    result["create_s"] = time.perf_counter() - started
    claim_s = write_s = 0.0
    for shard in range(n_shards):
        start, stop = layout.shard_rows(shard)
        features, scores, samples = _tiny_shard(start, stop)
        tick = time.perf_counter()
        store.claim_shard(shard, owner="worker-0")
        tock = time.perf_counter()
        store.write_shard(shard, features, scores, samples, content_sha256=sha256_bytes(str(shard).encode()))
        claim_s += tock - tick
        write_s += time.perf_counter() - tock
    result.update(claim_s=claim_s, write_s=write_s)
    started = time.perf_counter()
    done = store.done_shards()
    result["list_s"] = time.perf_counter() - started
    if len(done) != n_shards:
        raise RuntimeError(f"listed {len(done)} finished shards of {n_shards}")
    started = time.perf_counter()
    if not store.finalize():
        raise RuntimeError("finalize did not complete the store")
    result["finalize_s"] = time.perf_counter() - started
    result.update(_open_and_check(location, storage_options))
    return result


def _open_and_check(location: str, storage_options: dict | None, repeats: int = 3) -> dict:
    """Seconds to open the complete store (best of ``repeats``), to check every record as reads do, and sizes."""
    from gradindex.store import open_store

    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        store = open_store(location, storage_options=storage_options)
        best = min(best, time.perf_counter() - started)
    started = time.perf_counter()
    for shard in range(store.n_shards):
        store.shard_record(shard)
    check_s = time.perf_counter() - started
    manifest_bytes = len((store.path / "zarr.json").read_bytes())
    return {
        "open_s": best,
        "record_checks_s": check_s,
        "manifest_bytes": manifest_bytes,
        "samples_parquet_bytes": len((store.path / "samples.parquet").read_bytes()),
    }


def _per_thousand(record: dict) -> dict:
    per = 1000 / record["shards"]
    return {
        f"{name[:-2]}_ms_per_1000": record[name] * per * 1000
        for name in ("claim_s", "write_s", "list_s", "finalize_s", "open_s", "record_checks_s")
        if name in record
    }


def _moto() -> tuple[object, dict]:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )  # fmt: skip
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="gradindex-metadata")
    # named in the storage options: s3fs caches filesystems by their options, not by the environment
    return server, {"endpoint_url": endpoint}


def run(*, shards: int = 100_000, moto_shards: int = 3000, tiny: bool = False, work: Path | None = None) -> dict:
    """Measure, print and (unless ``tiny``) save the results."""
    if tiny:
        shards, moto_shards = 200, 200
    work = Path(work or tempfile.mkdtemp(prefix="gradindex-metadata-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    ram = Path(
        tempfile.mkdtemp(prefix="gradindex-metadata-scale-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )
    local_sizes = [("local", work, 1000)] + [("ram", ram, size) for size in sorted({10_000, shards})]
    s3_sizes = sorted({1000, moto_shards})
    if tiny:
        local_sizes, s3_sizes = [("local", work, shards)], [moto_shards]
    records = []
    started = time.perf_counter()
    for kind, folder, size in local_sizes:
        record = simulate(str(folder / f"{kind}-{size}.gradindex"), size)
        records.append({**record, "location": kind, **_per_thousand(record), "measured": True})
        print(json.dumps(records[-1]))
    saved = {name: os.environ.get(name) for name in _AWS_ENV}
    server, options = _moto()
    try:
        for size in s3_sizes:
            url = f"s3://gradindex-metadata/{uuid.uuid4().hex[:8]}/s3-{size}.gradindex"
            record = simulate(url, size, storage_options=options)
            records.append({**record, **_per_thousand(record), "measured": True})
            print(json.dumps(records[-1]))
        if shards > max(s3_sizes):
            records.append(_s3_at_scale(ram / f"ram-{shards}.gradindex", shards, records, options))
            print(json.dumps(records[-1]))
    finally:
        server.stop()
        shutil.rmtree(ram, ignore_errors=True)
        for name, value in saved.items():  # the caller's environment as it was
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    payload = {
        "machine": machine(),
        "command": "python -m benchmarks.metadata_scale" + (" --tiny" if tiny else f" --shards {shards}"),
        "rows_per_shard": ROWS_PER_SHARD,
        "dim": DIM,
        "seconds": time.perf_counter() - started,
        "loadavg_end": os.getloadavg(),
        "records": records,
    }
    if not tiny:
        save_json("metadata_scale", payload)
        update_section("metadata_scale", _markdown(payload))
        shutil.rmtree(work, ignore_errors=True)
    return payload


def _s3_at_scale(local_store: Path, shards: int, records: list[dict], options: dict) -> dict:
    """At ``shards`` on S3: the complete store's metadata (manifest, array metadata, samples.parquet) uploaded from the
    local run and opened and checked there (measured); writing, listing and finalizing extrapolated from the two S3
    sizes (a straight line through their seconds)."""
    import fsspec

    fs = fsspec.filesystem("s3", **options)
    url = f"s3://gradindex-metadata/{uuid.uuid4().hex[:8]}/s3-{shards}.gradindex"
    for name in ("zarr.json", "samples.parquet", "features/zarr.json", "self_influence/zarr.json"):
        fs.pipe(f"{url}/{name}", (local_store / name).read_bytes())
    measured = _open_and_check(url, options)
    record = {"location": "s3", "shards": shards, **measured, "measured": "open_s, record_checks_s"}
    small, large = [item for item in records if item["location"] == "s3"][:2]
    for name in ("claim_s", "write_s", "list_s", "finalize_s"):
        slope = (large[name] - small[name]) / (large["shards"] - small["shards"])
        record[name] = large[name] + slope * (shards - large["shards"])
    record.update(_per_thousand(record))
    record["extrapolated"] = "claim_s, write_s, list_s, finalize_s (linear through the two measured S3 sizes)"
    return record


def _markdown(payload: dict) -> str:
    info = payload["machine"]
    rows = []
    for record in payload["records"]:
        measured = record["measured"] is True
        mark = "" if measured else " (extrapolated)"
        rows.append(
            {
                "store": {"local": "local disk", "ram": "RAM (/dev/shm)", "s3": "S3 (moto, loopback)"}[
                    record["location"]
                ],
                "shards": f"{record['shards']:,}",
                "claim ms/1k": f"{record['claim_ms_per_1000']:,.0f}{mark}",
                "write ms/1k": f"{record['write_ms_per_1000']:,.0f}{mark}",
                "list ms/1k": f"{record['list_ms_per_1000']:,.1f}{mark}",
                "finalize ms/1k": f"{record['finalize_ms_per_1000']:,.0f}{mark}",
                "open ms/1k": f"{record['open_ms_per_1000']:,.1f}",
                "record checks ms/1k": f"{record['record_checks_ms_per_1000']:,.1f}",
                "manifest MiB": f"{record['manifest_bytes'] / 2**20:,.2f}",
                "manifest bytes/shard": f"{record['manifest_bytes'] / record['shards']:,.0f}",
            }
        )
    return (
        "## Metadata at scale: claims, records, finalize and the manifest per 1,000 shards\n\n"
        f"`{payload['command']}` on {info['cores']} cores ({info['cpu']}), {info['memory_gib']} GiB, {info['date']}; "
        f"{payload['seconds'] / 60:.1f} min; load average {payload['loadavg_end'][0]:.1f} at the end (shared "
        "machine). Shards of "
        f"{payload['rows_per_shard']} rows x {payload['dim']} dims written through the store's own functions (claim, "
        "write_shard with a content hash, finalize, open_store), one writer, no gradients: each figure is the "
        "metadata cost a build or query pays per 1,000 shards, whatever the shards hold. *local disk*: every write "
        "fsynced (the disk's latency); *RAM*: the same on /dev/shm (fsync free: the metadata's own CPU cost). "
        "*claim*: `claim_shard`; "
        "*write*: `write_shard` (features, self-influence, sample part, record; releases the claim); *list*: "
        "`done_shards` (`--resume`, progress); *finalize*: every record and sample part read back and checked, "
        "`samples.parquet` and the manifest written; *open*: `open_store` of the complete store (its manifest holds "
        "every record), best of 3; *record checks*: every record checked as reads check it (`shard_record`). The "
        "S3 row at the largest size measures open and record checks on the uploaded complete manifest; its other "
        "figures are extrapolated linearly from the two measured S3 sizes, and marked so.\n\n"
        + markdown_table(rows, list(rows[0]))
        + "\n"
    )
