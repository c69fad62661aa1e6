"""One measurement in a fresh process, so that its peak memory is its own.

    python -m benchmarks.memory_budget._probe query STORE OUT.npz --queries 100 --k 10 [--memory-budget BYTES]
    python -m benchmarks.memory_budget._probe self-influence STORE OUT.npz [--top N]

Prints one JSON line: seconds, the resident memory after imports (numpy, faiss, torch, gradindex), the store opened,
the queries made and (unless --cold) the process's machinery started on data that is not the store's: faiss's and
torch's thread pools, pyarrow's parquet reader (the baseline); and the peak resident memory after it (Linux's VmHWM,
reset at the baseline through /proc/self/clear_refs, so the imports' own peak does not count).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the process's peak resident memory to what it holds now (Linux 4.0+); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def measure(
    what: str, store_path: str, out: str, *, queries: int, k: int, memory_budget: int | None, top: int, warm: bool
) -> dict:
    import faiss  # noqa: F401  (imported before the baseline, as search imports it)
    import numpy as np
    import torch

    import gradindex

    store = gradindex.open_store(store_path)
    vectors = np.random.default_rng(1).standard_normal((queries, store.dim)).astype(np.float32)
    _ = gradindex.self_influence, gradindex.search.search_store  # their modules imported (they load on first use)
    if warm:  # start the thread pools (faiss's OpenMP, torch's) on a few rows that are not the store's
        rows = np.random.default_rng(2).standard_normal((64, store.dim)).astype(np.float16)
        gradindex.search.search_blocks([(0, rows)], vectors, k, use_gpu=False)
        torch.from_numpy(np.empty((64, store.dim), np.float32)).copy_(torch.from_numpy(rows))
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()  # pyarrow's parquet reader, started once (about 40 MiB, whatever the size)
        pq.write_table(pa.table({"row": np.arange(8)}), sink)
        pq.ParquetFile(pa.BufferReader(sink.getvalue())).read()
    baseline = (_status_kib("VmRSS") or 0) * 1024
    exact_peak = _reset_peak()
    started = time.perf_counter()
    result: dict = {"what": what, "memory_budget_bytes": memory_budget, "warm": warm, "loadavg_before": os.getloadavg()}
    if what == "query":
        scores, rows = gradindex.search_store(store, vectors, k, memory_budget=memory_budget, use_gpu=False)
        planner = getattr(gradindex.search, "streaming_plan", None)  # absent from gradindex before it (--compare)
        plan = planner(store, queries, k, memory_budget) if memory_budget and planner else None
        result.update(
            queries=queries,
            k=k,
            block_rows=None if plan is None else plan.block_rows,
            read_ahead=None if plan is None else plan.depth,
            planned_peak_bytes=None if plan is None else plan.peak_bytes,
        )
        np.savez(out, scores=scores, rows=rows)
    else:
        table = gradindex.self_influence(store, top=top or None)
        np.savez(out, rows=table.column("row").to_numpy(), scores=table.column("score").to_numpy())
        result.update(top=top or None, rows_out=table.num_rows)
    result["seconds"] = time.perf_counter() - started
    peak = (
        (_status_kib("VmHWM") or 0) * 1024 if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    result.update(
        baseline_rss_bytes=baseline,
        peak_rss_bytes=peak,
        peak_over_baseline_bytes=peak - baseline,
        peak_is_since_baseline=exact_peak,
        loadavg_after=os.getloadavg(),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["query", "self-influence"])
    parser.add_argument("store")
    parser.add_argument("out")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--memory-budget", type=int, default=None)
    parser.add_argument("--top", type=int, default=0)
    parser.add_argument("--cold", action="store_true", help="no warm-up of the thread pools before the baseline")
    args = parser.parse_args()
    result = measure(
        args.what,
        args.store,
        args.out,
        queries=args.queries,
        k=args.k,
        memory_budget=args.memory_budget,
        top=args.top,
        warm=not args.cold,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
