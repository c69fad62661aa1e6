"""One measurement in a fresh process, so that its peak memory (ru_maxrss) is its own.

    python -m benchmarks.scale._probe exact-streamed STORE QUERIES.npy OUT.npz --k 10 --memory-budget BYTES
    python -m benchmarks.scale._probe exact-memory   STORE QUERIES.npy OUT.npz --k 10
    python -m benchmarks.scale._probe read           STORE

Prints one JSON line: seconds, peak RSS, RSS before the measurement (after imports), load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(
    what: str,
    store_path: str,
    queries_path: str | None = None,
    out: str | None = None,
    *,
    k: int = 10,
    memory_budget: int = 1 << 30,
    repeats: int = 1,
) -> dict:
    import numpy as np

    import gradindex
    from gradindex.search import ExactIndex

    store = gradindex.open_store(store_path)
    baseline = _rss_bytes()
    result: dict = {"what": what, "loadavg_before": os.getloadavg()}
    if what == "read":
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            n_rows = 0
            for _, block in store.iter_blocks():
                n_rows += len(block)
            best = min(best, time.perf_counter() - started)
        result.update(seconds=best, rows=n_rows)
    else:
        queries = np.load(queries_path)
        if what == "exact-streamed":
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                scores, rows = gradindex.search_store(store, queries, k, memory_budget=memory_budget, use_gpu=False)
                best = min(best, time.perf_counter() - started)
            result.update(seconds=best)
        else:
            started = time.perf_counter()
            index = ExactIndex(store.dim, use_gpu=False)
            for _, block in store.iter_blocks():
                index.add(block)
            result["load_seconds"] = time.perf_counter() - started
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                scores, rows = index.search(queries, k)
                best = min(best, time.perf_counter() - started)
            result.update(seconds=best)
        np.savez(out, scores=scores, rows=rows)
        result["queries"] = int(len(queries))
    result.update(
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        baseline_rss_bytes=baseline,
        loadavg_after=os.getloadavg(),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["exact-streamed", "exact-memory", "read"])
    parser.add_argument("store")
    parser.add_argument("queries", nargs="?")
    parser.add_argument("out", nargs="?")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--memory-budget", type=int, default=1 << 30)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(
        json.dumps(
            measure(
                args.what,
                args.store,
                args.queries,
                args.out,
                k=args.k,
                memory_budget=args.memory_budget,
                repeats=args.repeats,
            )
        )
    )


if __name__ == "__main__":
    main()
