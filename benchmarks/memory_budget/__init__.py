"""Does ``--memory-budget`` hold? Exact query streaming and self-influence over a store whose shards are much larger
than the budget, each run in a fresh process, peak resident memory measured over that process's baseline.

    python -m benchmarks.memory_budget [--rows 500000] [--dim 256] [--rows-per-shard 200000] [--tiny]

The store is synthesized through the store's own writer (``create_store`` / ``write_shard``: random float16 vectors,
their squared norms as self-influence, ids ``s<row>``), in shards of 200,000 rows (98 MiB as float16, 195 MiB as the
float32 that search converts to). Each measurement runs in a subprocess (``_probe``): the baseline is that process
after its imports (numpy, faiss, torch, gradindex), the store opened and the queries made; the peak is Linux's VmHWM,
reset to the baseline through ``/proc/self/clear_refs``. Before the baseline each process starts its machinery on
data that is not the store's (faiss's and torch's thread pools, pyarrow's parquet reader: about 3 and 40 MiB once
per process, whatever the store), so the peak is what the step holds for the data. Exact search runs at each budget
and once in memory (default budget); every streamed answer is compared with the in-memory one. Self-influence takes
no budget (it reads 4 bytes per row and the sample ids): its peak is reported beside, for ``--top 100`` and for
every row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._report import machine, markdown_table, save_json, update_section

MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def synthesize(path: Path, n_rows: int, dim: int, rows_per_shard: int) -> None:
    """A complete float16 store of random vectors, written shard by shard through the store's writer."""
    import pyarrow as pa

    from gradindex.store import StoreLayout, create_store, open_store

    if path.exists():
        try:
            store = open_store(path)
            if store.complete and (store.n_samples, store.dim, store.layout.rows_per_shard) == (
                n_rows,
                dim,
                rows_per_shard,
            ):
                return
        except Exception:
            pass
    layout = StoreLayout.auto(n_rows, dim, "float16", rows_per_shard=rows_per_shard)
    store = create_store(path, layout, {"method": "synthetic"}, overwrite=True)
    rng = np.random.default_rng(0)
    for shard in range(store.n_shards):
        start, stop = layout.shard_rows(shard)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        samples = pa.table({"row": np.arange(start, stop), "sample_id": [f"s{row}" for row in range(start, stop)]})
        store.claim_shard(shard, owner="memory-budget-benchmark")
        store.write_shard(shard, block, np.einsum("ij,ij->i", block, block), samples)
        del block
    assert store.finalize()


def _probe(args: list[str], out: Path, tree: Path | None = None) -> dict:
    """One probe in a fresh process; with ``tree``, against the gradindex package in that folder (its own cwd comes
    first on the path) and this checkout's probe."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=f"{tree}:{ROOT}" if tree else str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_budget._probe", *args, str(out)],
        cwd=tree or ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"probe {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(
    *,
    rows: int = 500_000,
    dim: int = 256,
    rows_per_shard: int = 200_000,
    budgets: tuple[int, ...] = (64 * MIB, 256 * MIB),
    queries: int = 100,
    k: int = 10,
    work: Path | None = None,
    tiny: bool = False,
    compare_tree: Path | None = None,
) -> dict:
    """Measure, print and (unless ``tiny``) save ``results/memory_budget.json`` and the RESULTS.md section; with
    ``compare_tree`` (a folder holding another version's ``gradindex/``, e.g. ``git archive HEAD gradindex``), the
    budgeted queries run against it too, beside."""
    if tiny:
        rows, dim, rows_per_shard, budgets, queries = 3000, 32, 1000, (4352 << 10, 4608 << 10), 10
    work = Path(work or (Path("/tmp") / f"gradindex-memory-budget-{rows}x{dim}"))
    work.mkdir(parents=True, exist_ok=True)
    store_path = work / "store.gradindex"
    started = time.perf_counter()
    synthesize(store_path, rows, dim, rows_per_shard)
    synthesis_seconds = time.perf_counter() - started
    common = [str(store_path), "--queries", str(queries), "--k", str(k)]
    in_memory = _probe(["query", *common], work / "in_memory.npz")
    reference = np.load(work / "in_memory.npz")
    records = []
    for budget in budgets:
        record = _probe(["query", *common, "--memory-budget", str(budget)], work / f"budget_{budget}.npz")
        found = np.load(work / f"budget_{budget}.npz")
        record["equals_in_memory"] = bool(
            np.array_equal(found["rows"], reference["rows"]) and np.array_equal(found["scores"], reference["scores"])
        )
        record["within_budget"] = record["peak_over_baseline_bytes"] <= budget
        records.append(record)
    in_memory["equals_in_memory"] = True
    records.append(in_memory)
    for budget in budgets if compare_tree else ():
        out = work / f"compare_{budget}.npz"
        record = _probe(["query", *common, "--memory-budget", str(budget)], out, Path(compare_tree).resolve())
        found = np.load(out)
        record["equals_in_memory"] = bool(np.array_equal(found["rows"], reference["rows"]))
        record["within_budget"] = record["peak_over_baseline_bytes"] <= budget
        record["tree"] = str(compare_tree)
        records.append(record)
    for top in (100, 0):
        records.append(_probe(["self-influence", str(store_path), "--top", str(top)], work / f"self_{top}.npz"))
    payload = {
        "machine": machine(),
        "command": "python -m benchmarks.memory_budget"
        + (" --tiny" if tiny else "")
        + (f" --compare-tree {compare_tree}" if compare_tree else ""),
        "store": {
            "rows": rows,
            "dim": dim,
            "dtype": "float16",
            "rows_per_shard": rows_per_shard,
            "shard_mib_float16": rows_per_shard * dim * 2 / MIB,
            "shard_mib_float32": rows_per_shard * dim * 4 / MIB,
            "synthesis_seconds": synthesis_seconds,
        },
        "records": records,
        "compare_tree": None if compare_tree is None else str(compare_tree),
    }
    for record in records:
        print(json.dumps({key: record.get(key) for key in _SHOWN}))
    if not tiny:
        save_json("memory_budget", payload)
        update_section("memory_budget", _markdown(payload))
    return payload


_SHOWN = (
    "what",
    "memory_budget_bytes",
    "block_rows",
    "read_ahead",
    "planned_peak_bytes",
    "peak_over_baseline_bytes",
    "within_budget",
    "equals_in_memory",
    "seconds",
)


def _mib(value) -> str:
    return "" if value is None else f"{value / MIB:,.1f}"


def _markdown(payload: dict) -> str:
    store, info = payload["store"], payload["machine"]
    rows = []
    for record in payload["records"]:
        if record["what"] == "query":
            what = f"exact query, {record['queries']} queries, k={record['k']}"
            if record.get("tree"):
                what += ", gradindex before this change (compare tree)"
            budget = _mib(record["memory_budget_bytes"]) if record["memory_budget_bytes"] else "default (in memory)"
        else:
            what = f"self-influence, {'top ' + str(record['top']) if record['top'] else 'every row'}"
            budget = "takes none"
        rows.append(
            {
                "what": what,
                "budget MiB": budget,
                "block rows": record.get("block_rows") or "",
                "read ahead": record.get("read_ahead") if record.get("read_ahead") is not None else "",
                "planned peak MiB": _mib(record.get("planned_peak_bytes")),
                "peak over baseline MiB": _mib(record["peak_over_baseline_bytes"]),
                "baseline MiB": _mib(record["baseline_rss_bytes"]),
                "within budget": record.get("within_budget", ""),
                "answers equal in-memory": record.get("equals_in_memory", ""),
                "seconds": round(record["seconds"], 2),
            }
        )
    columns = list(rows[0])
    return (
        "## Memory budget: peak memory of streamed exact search and self-influence\n\n"
        f"`{payload['command']}` on {info['cores']} cores ({info['cpu']}), {info['memory_gib']} GiB, "
        f"faiss {info['faiss']}, {info['date']}; load average {payload['records'][0]['loadavg_before'][0]:.1f} "
        "at the start (shared machine).\n\n"
        f"Store: {store['rows']:,} x {store['dim']} float16, shards of {store['rows_per_shard']:,} rows "
        f"({store['shard_mib_float16']:.0f} MiB stored, {store['shard_mib_float32']:.0f} MiB as float32), synthesized "
        "through the store's writer. Each row is a fresh process; peak = VmHWM reset at the baseline (after imports, "
        "store opened, queries made, faiss's and torch's thread pools and pyarrow's parquet reader started on other "
        "data), so it counts what the step itself holds. Streamed answers are compared "
        "element for element with in-memory exact search."
        + (
            f" Rows marked *compare tree* run the gradindex package in `{payload['compare_tree']}` (another version, "
            "e.g. `git archive HEAD gradindex | tar -x -C DIR`) on the same store, budget and queries."
            if payload.get("compare_tree")
            else ""
        )
        + "\n\n"
        + markdown_table(rows, columns)
        + "\n"
    )
