"""Featurization and query speed, side by side in one process: gradindex, its peers, the training step, BLAS.

Featurization: for each model, every method featurizes (or scores) the same training samples at the same
checkpoint and k; samples/s is measured on up to ``n_train`` samples within a per-method time cap. Quality
is the Spearman correlation of each method's scores (test × an evaluation subset of train) with exact
TracIn scores (unprojected per-sample gradients). Peak memory is the process's peak RSS during the method,
above what it held before (VmHWM, reset through /proc/self/clear_refs).

Query: exact top-k over N float16 vectors of d = 1024 (as a store holds them), against numpy and torch
brute force (a float32 GEMM + top-k: the BLAS roofline) and faiss IndexFlatIP with its default settings.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from benchmarks._report import RESULTS_DIR, machine, markdown_table, save_json, update_section
from benchmarks.speed import _peers
from benchmarks.speed._models import WORKLOADS

COMMAND = "python -m benchmarks.speed"


# ---- memory ---------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory:
    """Peak RSS above the starting RSS, in MiB (Linux; None elsewhere)."""

    def __enter__(self):
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.ok = True
        except OSError:
            self.ok = False
        self.start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        # peak RSS above the start; 0 when the method only reused memory the process already held
        self.peak_mib = max(0.0, (_status_kib("VmHWM") - self.start) / 1024) if self.ok else None


# ---- featurization --------------------------------------------------------------------------------


def _timed(fn, inputs, targets, batch_size: int, n_max: int, cap_s: float) -> tuple[float, int]:
    """Samples/s of ``fn`` over consecutive batches: at most ``n_max`` samples or ``cap_s`` seconds (after one warm-up
    batch)."""
    fn(inputs[:batch_size], targets[:batch_size])
    done, started = 0, time.perf_counter()
    while done < n_max:
        stop = min(n_max, done + batch_size)
        fn(inputs[done:stop], targets[done:stop])
        done = stop
        if time.perf_counter() - started > cap_s:
            break
    return done / (time.perf_counter() - started), done


def _spearman(exact: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    from scipy.stats import spearmanr

    flat = float(spearmanr(exact.ravel(), scores.ravel()).statistic)
    per_query = float(np.nanmean([spearmanr(exact[q], scores[q]).statistic for q in range(len(exact))]))
    return flat, per_query


def _scores_of(runner: _peers.Runner, train, test) -> np.ndarray:
    if getattr(runner, "paired_scores", None) is not None:
        return runner.paired_scores(*train, *test).detach().numpy()
    if runner.vectors is not None:
        with torch.enable_grad():
            return (runner.vectors(*test) @ runner.vectors(*train).T).detach().numpy()
    return runner.scores(*train, *test).detach().numpy()


def featurization(tiny: bool, k: int, only: list[str] | None, log=print) -> list[dict]:
    # n_train timed, n_eval train samples for Spearman, n_test queries, per-method time cap (s), checkpoint steps
    sizes = {
        "mlp": (32, 8, 2, 0.2, 3) if tiny else (8192, 512, 16, 15, 300),
        "cnn": (16, 8, 2, 0.2, 3) if tiny else (2048, 256, 16, 15, 150),
        "transformer": (8, 8, 2, 0.2, 2) if tiny else (512, 64, 6, 30, 40),
        "transformer-uniform": (8, 8, 2, 0.2, 2) if tiny else (512, 64, 6, 30, 40),
    }
    learning_rates = {"transformer": 3e-3, "transformer-uniform": 3e-3}
    rows = []
    workdir = tempfile.mkdtemp(prefix="gradindex-speed-")
    for name, make in WORKLOADS.items():
        if only and name not in only:
            continue
        n_train, n_eval, n_test, cap_s, steps = sizes[name]
        # tiny: the same code paths on models small enough for seconds (a 1x32 LM, batches of 16)
        if tiny:
            lm = {"length": 17, "vocab": 64, "dim": 32, "layers": 1}
            options = {"transformer": lm, "transformer-uniform": lm, "mlp": {"hidden": 32}}.get(name, {})
            workload = make(n_train, n_test, **options)
        else:
            workload = make(n_train, n_test)
        if tiny:
            workload.batch_size = min(workload.batch_size, 16)
        checkpoint = str(Path(workdir) / f"{name}.pt")
        torch.save(workload.train_checkpoint(steps=steps, lr=learning_rates.get(name, 1e-3)).state_dict(), checkpoint)
        inputs, targets = workload.train.tensors
        train_eval = (inputs[-n_eval:], targets[-n_eval:])  # held out from kron's calibration (the first 256 samples)
        test = workload.test.tensors
        log(f"[{name}] {_peers.n_params(workload):,} parameters, k={k}, batch {workload.batch_size}")

        exact_runner = _peers.exact_runner(workload, checkpoint)
        exact_scores = _scores_of(exact_runner, train_eval, test)

        step = _peers.training_step(workload, checkpoint)
        with PeakMemory() as memory:
            train_rate, _ = _timed(step, inputs, targets, workload.batch_size, n_train, cap_s)
        rows.append(
            {
                "model": name,
                "method": "training step (SGD, reference)",
                "samples_per_s": train_rate,
                "peak_mib": memory.peak_mib,
                "note": "batched forward + backward + update",
            }
        )
        log(f"  training step: {train_rate:,.0f} samples/s")

        methods = [
            ("gradindex kron", lambda: _peers.gradindex_runner("kron", workload, checkpoint, k)),
            (
                "gradindex kron (orthogonal sides)",
                lambda: _peers.gradindex_runner("kron", workload, checkpoint, k, sides="orthogonal"),
            ),
            ("gradindex sjlt", lambda: _peers.gradindex_runner("sjlt", workload, checkpoint, k)),
            ("gradindex rademacher", lambda: _peers.gradindex_runner("rademacher", workload, checkpoint, k)),
        ]
        methods += [(key, lambda key=key: _peers.PEERS[key](workload, checkpoint, k)) for key in _peers.PEERS]
        if (
            name == "transformer-uniform"
        ):  # a control for the data, not another contest: gradindex's own projections only
            methods = methods[:3]
        for label, prepare in methods:
            row = {"model": name, "method": label}
            try:
                with PeakMemory() as memory:
                    runner = prepare()
                    row["method"] = runner.name
                    if runner.vectors is not None:
                        with torch.enable_grad():
                            rate, done = _timed(runner.vectors, inputs, targets, workload.batch_size, n_train, cap_s)
                    else:  # score-only methods: the time to score n samples against the test queries

                        def score(batch_inputs, batch_targets):
                            runner.scores(batch_inputs, batch_targets, *test)

                        rate, done = _timed(score, inputs, targets, workload.batch_size, n_train, cap_s)
                row.update(samples_per_s=rate, samples_timed=done, peak_mib=memory.peak_mib, note=runner.note)
                row["spearman"], row["spearman_per_query"] = _spearman(
                    exact_scores, _scores_of(runner, train_eval, test)
                )
                log(
                    f"  {row['method']}: {rate:,.1f} samples/s, Spearman {row['spearman']:.3f} (per query "
                    f"{row['spearman_per_query']:.3f})"
                )
            except _peers.Unavailable as reason:
                row.update(status="not run", note=str(reason))
                log(f"  {label}: not run ({reason})")
            except Exception as error:  # a peer that fails here is recorded, not hidden
                row.update(status="failed", note=f"{type(error).__name__}: {error}"[:300])
                log(f"  {label}: failed ({type(error).__name__}: {error})")
                if os.environ.get("GRADINDEX_BENCH_DEBUG"):
                    traceback.print_exc()
            rows.append(row)
            gc.collect()
        _compare(rows, name, train_rate)
    shutil.rmtree(workdir, ignore_errors=True)
    return rows


def _compare(rows: list[dict], model: str, train_rate: float) -> None:
    """Ratios to the training step and to the fastest peer, and, for gradindex's rows, to the fastest peer whose
    Spearman to exact (flattened) is at least as high: speed counts only at equal or better quality."""
    mine = [row for row in rows if row["model"] == model and row.get("samples_per_s")]
    peers = [row for row in mine if not row["method"].startswith(("gradindex", "training"))]
    fastest = max(peers, key=lambda row: row["samples_per_s"]) if peers else None
    for row in mine:
        row["x_training_step"] = row["samples_per_s"] / train_rate
        if fastest:
            row["x_fastest_peer"] = row["samples_per_s"] / fastest["samples_per_s"]
            row["fastest_peer"] = fastest["method"]
        if not peers and row["method"].startswith("gradindex"):
            row["fastest_peer_at_quality"] = "no peer ran"  # none installed (pip install -e ".[bench]")
        elif row["method"].startswith("gradindex") and row.get("spearman") is not None:
            equal = [peer for peer in peers if peer.get("spearman") is not None and peer["spearman"] >= row["spearman"]]
            if equal:
                best = max(equal, key=lambda peer: peer["samples_per_s"])
                row["fastest_peer_at_quality"] = best["method"]
                row["x_fastest_peer_at_quality"] = row["samples_per_s"] / best["samples_per_s"]
            else:
                row["fastest_peer_at_quality"] = "none as accurate"


# ---- query ----------------------------------------------------------------------------------------


def query(tiny: bool, log=print) -> list[dict]:
    import faiss

    from gradindex.search import ExactIndex, search_blocks

    sizes = [2_000] if tiny else [100_000, 300_000, 1_000_000]
    dim, k = (128, 10) if tiny else (1024, 10)
    query_counts = [10] if tiny else [10, 100]
    rows = []
    rng = np.random.default_rng(0)
    for n_samples in sizes:
        stored = np.empty((n_samples, dim), dtype=np.float16)
        for start in range(0, n_samples, 50_000):
            stored[start : start + 50_000] = rng.standard_normal(
                (min(50_000, n_samples - start), dim), dtype=np.float32
            )
        dense = stored.astype(np.float32)
        started = time.perf_counter()
        index = ExactIndex(dim, use_gpu=False)
        index.add(stored)
        add_s = time.perf_counter() - started
        flat = torch.from_numpy(dense)
        for n_queries in query_counts:
            queries = rng.standard_normal((n_queries, dim), dtype=np.float32)

            def torch_brute():
                return torch.topk(torch.from_numpy(queries) @ flat.T, k, dim=1)

            def numpy_brute():
                scores = queries @ dense.T
                top = np.argpartition(-scores, k, axis=1)[:, :k]
                return np.take_along_axis(scores, top, axis=1), top

            def faiss_default():
                saved = faiss.cvar.distance_compute_blas_threshold
                faiss.cvar.distance_compute_blas_threshold = 20  # faiss's own default
                try:
                    return default_index.search(queries, k)
                finally:
                    faiss.cvar.distance_compute_blas_threshold = saved

            default_index = faiss.IndexFlatIP(dim)
            default_index.add(dense)
            block_rows = 65_536

            def streamed():
                return search_blocks(
                    ((start, stored[start : start + block_rows]) for start in range(0, n_samples, block_rows)),
                    queries,
                    k,
                    use_gpu=False,
                )

            candidates = {
                "gradindex ExactIndex (in memory)": lambda: index.search(queries, k),
                "gradindex search_blocks (streamed fp16 blocks)": streamed,
                "torch GEMM + topk (roofline)": torch_brute,
                "numpy GEMM + argpartition": numpy_brute,
                "faiss IndexFlatIP, default settings": faiss_default,
            }
            timings = {}
            for label, fn in candidates.items():
                fn()
                best = float("inf")
                for _ in range(3 if not tiny else 1):
                    started = time.perf_counter()
                    fn()
                    best = min(best, time.perf_counter() - started)
                timings[label] = best
            roofline = timings["torch GEMM + topk (roofline)"]
            for label, seconds in timings.items():
                rows.append(
                    {
                        "n_samples": n_samples,
                        "dim": dim,
                        "queries": n_queries,
                        "k": k,
                        "method": label,
                        "seconds": seconds,
                        "queries_per_s": n_queries / seconds,
                        "x_roofline_time": seconds / roofline,
                    }
                )
            log(
                f"[query] N={n_samples:,} q={n_queries}: "
                + ", ".join(f"{label.split(' (')[0]} {seconds * 1e3:.0f} ms" for label, seconds in timings.items())
            )
            default_index = None
        rows.append(
            {
                "n_samples": n_samples,
                "dim": dim,
                "method": "gradindex ExactIndex.add (fp16 -> fp32, chunked)",
                "seconds": add_s,
            }
        )
        stored = dense = flat = index = None  # free this size's arrays before the next one
        gc.collect()
    return rows


# ---- report ---------------------------------------------------------------------------------------


def _plot(featurize_rows: list[dict], query_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({row["model"] for row in featurize_rows}, key=list(WORKLOADS).index)
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(5 * (len(models) + 1), 4.8))
    for axis, model in zip(axes, models):
        ran = [row for row in featurize_rows if row["model"] == model and row.get("samples_per_s")]
        labels = [row["method"].replace(" (", "\n(") for row in ran]
        colors = [
            "tab:green"
            if row["method"].startswith("gradindex")
            else "tab:gray"
            if row["method"].startswith("training")
            else "tab:blue"
            for row in ran
        ]
        axis.barh(labels, [row["samples_per_s"] for row in ran], color=colors)
        axis.set_xscale("log")
        axis.set_title(f"{model}: featurization samples/s")
        axis.tick_params(axis="y", labelsize=7)
        for position, row in enumerate(ran):
            if row.get("spearman") is not None:
                axis.text(row["samples_per_s"], position, f" ρ={row['spearman']:.2f}", va="center", fontsize=7)
    axis = axes[-1]
    for label in sorted({row["method"] for row in query_rows if "queries" in row}):
        points = [
            (row["n_samples"], row["seconds"])
            for row in query_rows
            if row["method"] == label and row.get("queries") == max(r.get("queries", 0) for r in query_rows)
        ]
        if points:
            axis.plot(*zip(*points), marker="o", label=label)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("N vectors (d = 1024)")
    axis.set_ylabel("seconds per query batch")
    axis.set_title("exact top-10 search")
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(payload: dict) -> str:
    info = payload["machine"]
    lines = [
        "## Featurization and query speed (`benchmarks/speed`)",
        "",
        f"Command: `{payload['command']}`. Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, "
        f"torch {info['torch']}, faiss {info['faiss']}, CUDA {info['cuda']}; load average at start "
        f"{payload['load_average']}. "
        f"k = {payload['k']} per checkpoint, one checkpoint, float32 on CPU. ρ = Spearman of the method's scores "
        "(test × "
        "train subset) with exact TracIn scores (unprojected per-sample gradients), flattened and averaged per query.",
        "",
        "Data: 28×28 digits (sklearn's 8×8, upsampled and jittered) for the MLP and the CNN. The transformer LM reads "
        "structured synthetic text: motifs of 3-8 tokens chained by a sparse random Markov chain (3 successors each), "
        "5% of "
        "tokens replaced at random, vocabulary 512, 64-token contexts, trained 40 Adam steps (batch 128, lr 3e-3) "
        "before featurizing. The "
        "`transformer-lm-2x256-uniform-tokens` rows are the same model on i.i.d. uniform tokens: a control with "
        "nothing to "
        "learn, where training gradients are nearly orthogonal and every random projection ranks poorly.",
        "",
        "`x_fastest_peer` compares with the fastest peer whatever its quality; `x_fastest_peer_at_quality` only with "
        "the "
        "fastest peer whose flattened ρ is at least gradindex's (speed counts only at equal or better quality; 'none "
        "as "
        "accurate' when no peer reaches it). Peers that score a different quantity (Captum's TracInCPFast and Bergson "
        "on the "
        "CNN: final layer only) are shown, and count only through their ρ. gradindex kron's plan (k per layer, from "
        "gradient "
        "energies on the first 256 training samples) and its side matrices (default pca: each side's top directions "
        "on those "
        "samples) are computed once per build, outside the timed loop; the time is in the note. ρ is measured on the "
        "last "
        "training samples, which that calibration never saw. `gradindex kron (orthogonal sides)` is `--kron-sides "
        "orthogonal`: "
        "seeded random sides, no data-dependent matrices.",
        "",
    ]
    columns = [
        "model",
        "method",
        "samples_per_s",
        "x_training_step",
        "x_fastest_peer",
        "fastest_peer_at_quality",
        "x_fastest_peer_at_quality",
        "spearman",
        "spearman_per_query",
        "peak_mib",
        "status",
        "note",
    ]
    summary = []
    for row in payload["featurization"]:
        if row["method"] == "gradindex kron" and row.get("samples_per_s") and row.get("fastest_peer_at_quality"):
            versus = (
                f"{row['x_fastest_peer_at_quality']:.3g}× the fastest peer at equal or better ρ "
                f"({row['fastest_peer_at_quality']})"
                if row.get("x_fastest_peer_at_quality")
                else "no peer as accurate"
            )
            summary.append(
                f"{row['model']}: ρ {row['spearman']:.3f}, {row['x_training_step']:.2f}× the training step's rate, "
                f"{versus}"
            )
    if summary:
        lines += [
            "gradindex kron against the issue's targets (ρ ≥ 0.95; within 3× of the training step; ≥ 10× the fastest "
            "peer "
            "at equal or better ρ): " + "; ".join(summary) + ".",
            "",
        ]
    lines.append(markdown_table(payload["featurization"], columns))
    if payload.get("query"):
        lines += [
            "",
            "Exact top-10 search, float16 vectors (as a store holds them); time per query batch, best of 3:",
            "",
        ]
        lines.append(
            markdown_table(
                [row for row in payload["query"] if "queries" in row],
                ["n_samples", "queries", "method", "seconds", "queries_per_s", "x_roofline_time"],
            )
        )
    lines += ["", f"![speed](results/{payload['plot']})"]
    return "\n".join(lines)


def run(
    tiny: bool = False,
    k: int | None = None,
    models: list[str] | None = None,
    with_query: bool = True,
    write: bool = True,
    log=print,
) -> dict:
    torch.manual_seed(0)
    k = k or (32 if tiny else 1024)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    payload = {
        "command": COMMAND + (" --tiny" if tiny else ""),
        "tiny": tiny,
        "k": k,
        "machine": machine(),
        "load_average": [round(value, 2) for value in load] if load else None,
        "featurization": featurization(tiny, k, models, log=log),
        "query": query(tiny, log=log) if with_query else [],
    }
    if write:
        name = "speed-tiny" if tiny else "speed"
        payload["plot"] = f"{name}.png"
        save_json(name, payload)
        _plot(payload["featurization"], payload["query"], RESULTS_DIR / payload["plot"])
        if not tiny:
            update_section("speed", _markdown(payload))
    return payload


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="seconds, tiny sizes (what the test suite runs); writes speed-tiny.json"
    )
    parser.add_argument("--k", type=int, help="projection dim per checkpoint (default 1024; 64 with --tiny)")
    parser.add_argument("--models", nargs="*", choices=list(WORKLOADS), help="only these models")
    parser.add_argument("--no-query", action="store_true", help="skip the query-side benchmark")
    args = parser.parse_args(argv)
    # peers' progress bars (dattri: one per batch) would flood the log; set here, not in run(), which the
    # test suite calls in-process and whose environment later tests share
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    payload = run(tiny=args.tiny, k=args.k, models=args.models, with_query=not args.no_query)
    print(
        json.dumps({"results": str(RESULTS_DIR / ("speed-tiny.json" if args.tiny else "speed.json"))}), file=sys.stderr
    )
    del payload
