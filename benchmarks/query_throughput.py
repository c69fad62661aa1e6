"""Query throughput: exact top-k over a store, in memory and streamed, beside numpy brute force.

python -m benchmarks.query_throughput            # N = 100k x d = 1024 float16 store
python -m benchmarks.query_throughput --tiny     # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

import gradindex
from benchmarks._report import machine, markdown_table, save_json, update_section
from gradindex.search import brute_force_topk
from gradindex.store import StoreLayout, create_store


def _synthetic_store(path: Path, n_samples: int, dim: int, seed: int = 0):
    layout = StoreLayout.auto(n_samples, dim, "float16")
    store = create_store(path, layout, {"benchmark": "query_throughput"})
    rng = np.random.default_rng(seed)
    for shard in range(layout.n_shards):
        start, stop = layout.shard_rows(shard)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        store.claim_shard(shard, owner="bench")
        store.write_shard(
            shard,
            block,
            (block * block).sum(1),
            pa.table({"row": np.arange(start, stop), "sample_id": np.arange(start, stop)}),
        )
    store.finalize()
    return gradindex.open_store(path)


def _best(fn, repeats: int = 3) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def run(tiny: bool = False) -> dict:
    n_samples, dim, n_queries, k = (5_000, 256, 20, 10) if tiny else (100_000, 1024, 100, 10)
    workdir = Path(tempfile.mkdtemp(prefix="gi-bench-query-"))
    try:
        store = _synthetic_store(workdir / "s.gradindex", n_samples, dim)
        queries = np.random.default_rng(1).standard_normal((n_queries, dim), dtype=np.float32)
        load_seconds, vectors = _best(lambda: store.read_features().astype(np.float32), repeats=1)
        rows = []
        memory_seconds, (_scores, found) = _best(lambda: gradindex.search_store(store, queries, k))
        rows.append(
            {
                "method": "gradindex exact, in memory (load + search)",
                "seconds": memory_seconds,
                "queries_per_s": n_queries / memory_seconds,
            }
        )
        streamed_seconds, (_streamed_scores, streamed_found) = _best(
            # the budget whole shards need, two read ahead (less than the in-memory search needs at 4 shards)
            lambda: gradindex.search_store(
                store,
                queries,
                k,
                memory_budget=gradindex.search.streaming_plan(store, len(queries), k, 1 << 40).peak_bytes,
            )
        )
        rows.append(
            {
                "method": "gradindex exact, streamed per shard",
                "seconds": streamed_seconds,
                "queries_per_s": n_queries / streamed_seconds,
            }
        )
        from gradindex.search import ExactIndex

        index = ExactIndex(dim, use_gpu=False)
        index.add(vectors)
        search_seconds, _ = _best(lambda: index.search(queries, k))
        rows.append(
            {
                "method": "gradindex ExactIndex.search (vectors resident)",
                "seconds": search_seconds,
                "queries_per_s": n_queries / search_seconds,
            }
        )

        def numpy_gemm_topk():
            scores = queries @ vectors.T
            top = np.argpartition(-scores, k, axis=1)[:, :k]
            return np.take_along_axis(scores, top, 1), top

        gemm_seconds, _ = _best(numpy_gemm_topk)
        rows.append(
            {
                "method": "numpy float32 GEMM + argpartition (resident)",
                "seconds": gemm_seconds,
                "queries_per_s": n_queries / gemm_seconds,
            }
        )
        _, expected_rows = brute_force_topk(vectors, queries, k)
        correct = bool(np.array_equal(found, expected_rows) and np.array_equal(streamed_found, expected_rows))
        for row in rows:
            print(f"{row['method']:<50} {row['queries_per_s']:>10,.1f} queries/s")
        print(f"store read+decode: {load_seconds:.2f}s; results equal brute force: {correct}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    payload = {
        "benchmark": "query_throughput",
        "tiny": tiny,
        "machine": machine(),
        "command": "python -m benchmarks.query_throughput" + (" --tiny" if tiny else ""),
        "n_samples": n_samples,
        "dim": dim,
        "dtype": "float16",
        "n_queries": n_queries,
        "k": k,
        "store_read_seconds": load_seconds,
        "equal_to_brute_force": correct,
        "rows": rows,
    }
    if not tiny:
        save_json("query_throughput", payload)
        body = (
            "## Query throughput (issue 2 scaffold)\n\n"
            f"`{payload['command']}` on {payload['machine']['cores']} cores ({payload['machine']['cpu']}), faiss "
            f"{payload['machine']['faiss']}, {payload['machine']['date']}.\n"
            f"Store of N = {n_samples:,} × d = {dim} float16, {n_queries} queries, k = {k}; best of 3. "
            f"Reading + decoding the whole store takes {load_seconds:.2f} s; every method's top-k equals numpy "
            f"float64 brute force: {correct}.\n\n" + markdown_table(rows, ["method", "seconds", "queries_per_s"])
        )
        update_section("query-throughput", body)
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run (results not saved)")
    run(tiny=parser.parse_args().tiny)


if __name__ == "__main__":
    main()
