"""Build and query time of one small store on local disk, at memory:// and on S3 (moto's server on loopback).

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.remote_stores [--rows 2000] [--repeats 3]

Prints one markdown table (median seconds of ``--repeats`` runs). Needs s3fs and moto[server] (the
``test`` extra). Loopback S3 measures the protocol's round trips (one PUT per file, HEAD/GET per read),
not a network.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch

import gradindex

ROOT = Path(__file__).resolve().parents[1]
TASK = f"{ROOT / 'tests' / 'tiny_tasks.py'}:mlp_task"


def _checkpoints(directory: Path) -> list[str]:
    specs = []
    for position in range(3):
        torch.manual_seed(100 + position)
        model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        path = directory / f"ckpt-{position}.pt"
        torch.save(model.state_dict(), path)
        specs.append(f"{path}:1.0")
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="training samples (rows of the store)")
    parser.add_argument("--rows-per-shard", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="gradindex-bench")

    torch.set_num_threads(1)
    task = gradindex.load_task(TASK, n_train=args.rows, n_test=20)
    options = {"proj_dim": 64, "projection": "rademacher", "rows_per_shard": args.rows_per_shard, "progress": False}
    work = Path(tempfile.mkdtemp(prefix="gradindex-remote-bench-"))
    checkpoints = _checkpoints(work)
    gradindex.build(task, checkpoints, work / "warmup.gradindex", **options)  # imports, torch warm-up

    targets = {
        "local": lambda run: str(work / f"local-{run}.gradindex"),
        "memory://": lambda run: f"memory://gradindex-bench/{run}.gradindex",
        "s3:// (moto, loopback)": lambda run: f"s3://gradindex-bench/{uuid.uuid4().hex[:8]}/{run}.gradindex",
    }
    rows = []
    reference = None
    for name, location in targets.items():
        build_times, query_times = [], []
        for run in range(args.repeats):
            url = location(run)
            started = time.perf_counter()
            gradindex.build(task, checkpoints, url, **options)
            build_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            table = gradindex.query(url, task, samples="0-19", k=10, progress=False)
            query_times.append(time.perf_counter() - started)
            if reference is None:
                reference = table
            assert table.equals(reference), f"{name} answers differently"
        rows.append((name, statistics.median(build_times), statistics.median(query_times)))
    server.stop()

    n_shards = -(-args.rows // args.rows_per_shard)
    print(
        f"{args.rows} rows x 192 dims (3 checkpoints x 64) in {n_shards} shards; 20 queries, k=10; median of "
        f"{args.repeats}"
    )
    print(f"load average: {os.getloadavg()}")
    print("| store | build s | query s (open + featurize + search) |")
    print("|---|---|---|")
    for name, build_s, query_s in rows:
        print(f"| {name} | {build_s:.3f} | {query_s:.3f} |")


if __name__ == "__main__":
    main()
