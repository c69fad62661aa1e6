"""What a user pays to index a training set, side by side in one process: gradindex, its peers, a training epoch.

Build (the table): for each model, ``gradindex.build`` end to end, in process (task checks, kron calibration,
featurizing, hashing, writing and finalizing the store: everything from the call to its return), one checkpoint,
k = 1024, the default projection, over all N training samples; beside one training epoch over the same N samples
(batch 256, SGD: forward, backward, update; one warm-up batch first) and beside the peers on the same model,
checkpoint and k. A peer that would take too long on all N samples is timed on the last rows (at least one batch,
until its time cap) and its seconds for N are extrapolated from that rate (the note says from how many samples).
Quality: per-query Spearman of each method's scores (test queries × the last training rows, which kron's
calibration on the first rows never saw) with exact TracIn scores (unprojected per-sample gradients, one backward
per sample), and the same flattened over all pairs. Peak memory: the process's peak RSS during the method, above
what it held before (VmHWM, reset through /proc/self/clear_refs).

Scaling: gradindex build time beside the training epoch against N (the MLP 784-512-512-10) and against the hidden
width h (an MLP 784-h-h-10 on a fixed N).

Query: exact top-k over N float16 vectors of d = 1024 (as a store holds them), against numpy and torch brute force
(a float32 GEMM + top-k) and faiss IndexFlatIP with its default settings.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks._report import RESULTS_DIR, machine, markdown_table, save_json, update_section
from benchmarks.speed import _peers
from benchmarks.speed._models import Workload, cnn_workload, deep_mlp_workload, llama_workload

COMMAND = "python -m benchmarks.speed"
TARGETS = {"mlp": 1.5, "wide-mlp": 3.0, "lm": 2.0}  # issue 16: build seconds / training-epoch seconds


# ---- settings -------------------------------------------------------------------------------------


@dataclass
class Setting:
    """One model of the table and how it is measured."""

    make: object  # (n_train, n_test) -> Workload
    n_train: int
    n_eval: int  # the last training rows, scored against the queries for ρ
    n_test: int
    steps: int  # Adam steps before the checkpoint (TracIn on random weights would measure nothing useful)
    lr: float
    train_batch: int  # rows per Adam step before the checkpoint
    cap_s: float  # time cap per peer (at least one batch runs)
    whole_n: int  # training rows for peers timed as a whole (kronfluence, Bergson's build path)
    micro_batch: int = 256  # the training epoch's batch 256 is split into micro-batches of this size (memory)
    exact: bool = True
    options: dict = field(default_factory=dict)


def _settings(mode: str) -> dict[str, Setting]:
    if mode == "tiny":  # the same code paths on models small enough for seconds
        return {
            "mlp": Setting(lambda n, t: deep_mlp_workload(n, t, (32, 32)), 96, 16, 3, 3, 1e-3, 32, 0.2, 32),
            "cnn": Setting(cnn_workload, 48, 16, 3, 3, 1e-3, 16, 0.2, 16),
            "wide-mlp": Setting(
                lambda n, t: deep_mlp_workload(n, t, (64, 64), side=32), 64, 16, 3, 3, 1e-3, 32, 0.2, 16
            ),
            "lm": Setting(
                lambda n, t: llama_workload(n, t, length=16, vocab=64, dim=32, layers=1), 16, 8, 2, 2, 3e-3, 8, 0.2, 8
            ),
        }
    if mode == "quick":  # development: every path at a tenth of the size
        return {
            "mlp": Setting(lambda n, t: deep_mlp_workload(n, t, (512, 512)), 2000, 64, 8, 100, 1e-3, 128, 3, 256),
            "cnn": Setting(cnn_workload, 1000, 64, 8, 50, 1e-3, 128, 3, 256),
            "wide-mlp": Setting(
                lambda n, t: deep_mlp_workload(n, t, (1024, 1024), side=32), 500, 16, 4, 20, 1e-3, 64, 3, 64
            ),
            "lm": Setting(
                lambda n, t: llama_workload(n, t, length=128, vocab=1024, dim=128, layers=2),
                32,
                8,
                2,
                4,
                3e-3,
                8,
                3,
                8,
                micro_batch=32,
            ),
        }
    return {
        "mlp": Setting(lambda n, t: deep_mlp_workload(n, t, (512, 512)), 20_000, 128, 16, 300, 1e-3, 128, 10, 512),
        "cnn": Setting(cnn_workload, 5000, 128, 16, 150, 1e-3, 128, 10, 256),
        "wide-mlp": Setting(
            lambda n, t: deep_mlp_workload(n, t, (4096, 4096), side=32), 4000, 32, 8, 30, 1e-3, 64, 15, 64
        ),
        "lm": Setting(llama_workload, 512, 16, 4, 6, 3e-3, 8, 15, 16, micro_batch=32),
    }


def _scaling_settings(mode: str) -> tuple[list[int], list[int], int]:
    """(N values for the MLP 784-512-512-10, hidden widths h of an MLP 1024-h-h-10 (32×32 inputs, so that h = 4096
    is the table's wide MLP), that curve's N)."""
    if mode == "tiny":
        return [32, 64], [16, 32], 64
    if mode == "quick":
        return [500, 1000, 2000], [128, 256, 512], 500
    return [2500, 5000, 10_000, 20_000], [256, 1024, 2048, 4096], 4000


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
    """Peak RSS above the starting RSS, in MiB (Linux; None elsewhere). The objects alive on entry are frozen out of
    the garbage collector's sight until exit (``gc.freeze``): a method that calls ``gc.collect()`` (kronfluence,
    ten times a run) then pays for its own objects, not for everything this benchmark process holds."""

    def __enter__(self):
        gc.collect()
        gc.freeze()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.ok = True
        except OSError:
            self.ok = False
        self.start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        gc.unfreeze()
        # peak RSS above the start; 0 when the method only reused memory the process already held
        self.peak_mib = max(0.0, (_status_kib("VmHWM") - self.start) / 1024) if self.ok else None


# ---- what is timed --------------------------------------------------------------------------------


class Clock:
    """Wall seconds and this process's CPU seconds (all its threads) since it was made: the CPU figure is the one a
    shared, busy machine disturbs least."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def since(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def training_epoch(
    workload: Workload, checkpoint: str, micro_batch: int = 256, batch: int = 256
) -> tuple[float, float]:
    """(wall, CPU) seconds of one SGD epoch over the training set, batch ``batch`` (shuffled; each batch in
    micro-batches of ``micro_batch`` whose gradients add up, where a batch of 256 would not fit in memory), after one
    untimed warm-up micro-batch."""
    model = _peers._load(workload, checkpoint).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    inputs, targets = workload.train.tensors
    n = len(inputs)
    workload.loss(model, (inputs[:micro_batch], targets[:micro_batch])).mean().backward()
    optimizer.zero_grad()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    clock = Clock()
    for start in range(0, n, batch):
        rows = order[start : start + batch]
        optimizer.zero_grad()
        for part in rows.split(micro_batch):
            loss = workload.loss(model, (inputs[part], targets[part])).sum() / len(rows)
            loss.backward()
        optimizer.step()
    return clock.since()


def gradindex_build(workload: Workload, checkpoint: str, k: int, folder: str, **options) -> tuple[float, float, tuple]:
    """(wall, CPU) seconds of ``gradindex.build`` (default projection, k per checkpoint, one checkpoint) over the
    whole training set, from the call to its return, and (the opened store, the task); ``options`` go to the build."""
    import gradindex

    task = gradindex.Task(model=workload.make_model, train=workload.train, test=workload.test, loss=workload.loss)
    output = Path(folder) / f"{workload.name}.gradindex"
    clock = Clock()
    store = gradindex.build(task, [f"{checkpoint}:1.0"], output, proj_dim=k, progress=False, overwrite=True, **options)
    wall, cpu = clock.since()
    return wall, cpu, (store, task)


def gradindex_scores(store, task, eval_rows: np.ndarray) -> np.ndarray:
    """Scores [n_test, n_eval] of the test queries against the evaluated rows, through ``gradindex.query`` (the
    queries featurized from the store's manifest, searched over every row)."""
    import gradindex

    n_rows = store.n_samples
    table = gradindex.query(store, task, split="test", k=n_rows, progress=False).to_pydict()
    n_test = len(task.test)
    full = np.full((n_test, n_rows), np.nan)
    full[np.asarray(table["query"]), np.asarray(table["row"])] = np.asarray(table["score"])
    return full[:, eval_rows]


def exact_scores(workload: Workload, checkpoint: str, eval_rows: np.ndarray) -> np.ndarray:
    """Exact TracIn scores [n_test, n_eval]: ⟨∇ℓ(q), ∇ℓ(z)⟩ over every parameter, one backward per sample."""
    model = _peers._load(workload, checkpoint)
    params = [p for p in model.parameters() if p.requires_grad]
    inputs, targets = workload.train.tensors
    test_inputs, test_targets = workload.test.tensors

    def gradient(x, y):
        loss = workload.loss(model, (x[None], y[None])).sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    queries = torch.stack([gradient(test_inputs[i], test_targets[i]) for i in range(len(test_inputs))])
    scores = np.empty((len(queries), len(eval_rows)))
    for column, row in enumerate(eval_rows):
        scores[:, column] = (queries @ gradient(inputs[row], targets[row])).detach().numpy()
    return scores


def _spearman(exact: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    from scipy.stats import spearmanr

    flat = float(spearmanr(exact.ravel(), scores.ravel()).statistic)
    per_query = float(np.nanmean([spearmanr(exact[q], scores[q]).statistic for q in range(len(exact))]))
    return flat, per_query


def run_peer(runner: _peers.Runner, workload: Workload, setting: Setting) -> dict:
    """Time one peer: its training rows taken from the last (the evaluated rows first), batch by batch until all N
    are done or its time cap is past, or as a whole over the last ``whole_n`` rows; returns the seconds for N (measured
    or extrapolated), the rows timed and its scores on the evaluated rows."""
    inputs, targets = workload.train.tensors
    test_inputs, test_targets = workload.test.tensors
    n = len(inputs)
    n_eval = min(setting.n_eval, n)
    if runner.whole is not None:
        rows = torch.arange(n - min(setting.whole_n, n), n)
        clock = Clock()
        with torch.enable_grad():
            scores = runner.whole(inputs[rows], targets[rows], test_inputs, test_targets)
        wall, cpu = clock.since()
        query = getattr(runner.whole, "query_s", (0.0, 0.0))  # its query side, not part of the build
        # a part that does not grow with N (kronfluence's factor fit on a subset) is counted once
        fixed = getattr(runner.whole, "fixed_s", (0.0, 0.0))
        scores = torch.as_tensor(scores).detach().numpy()
        return {
            "timed": len(rows),
            "timed_s": (wall - query[0] - fixed[0], cpu - query[1] - fixed[1]),
            "fixed_s": fixed,
            "scores": scores[:, -n_eval:],
        }
    batch = workload.peer_batch or workload.batch_size
    if runner.estimate is not None:
        return {"timed": batch, "timed_s": runner.estimate(batch), "scores": None, "estimated": True}
    # row order: the evaluated rows (the last n_eval) first, then downwards from there
    order = torch.cat([torch.arange(n - n_eval, n), torch.arange(n - n_eval - 1, -1, -1)])
    test_vectors = None
    if runner.vectors is not None:
        with torch.enable_grad():
            test_vectors = runner.vectors(test_inputs, test_targets).detach()
    eval_parts: list[torch.Tensor] = []
    done, clock = 0, Clock()
    while done < n:
        rows = order[done : done + (min(batch, n_eval - done) if done < n_eval else batch)]
        with torch.enable_grad():
            if runner.vectors is not None:
                out = runner.vectors(inputs[rows], targets[rows]).detach()
            else:
                out = runner.scores(inputs[rows], targets[rows], test_inputs, test_targets).detach()
        if done < n_eval:
            eval_parts.append(out)
        done += len(rows)
        if clock.since()[0] > setting.cap_s:  # at least one batch; ρ only where the evaluated rows were all done
            break
    timed_s = clock.since()
    scores = None
    if done >= n_eval:
        found = torch.cat(eval_parts, dim=0 if runner.vectors is not None else 1)
        scores = (test_vectors @ found.T if runner.vectors is not None else found).numpy()
        scores = scores[:, np.argsort(order[:n_eval].numpy())]  # back to row order
    return {"timed": done, "timed_s": timed_s, "scores": scores}


# ---- the table ------------------------------------------------------------------------------------


def build_table(
    mode: str, k: int, only: list[str] | None, peers: list[str] | None = None, log=print, after_model=None
) -> list[dict]:
    """The table: per model, the training epoch, gradindex's end-to-end build and every peer (``peers``: keys of
    ``_peers.PEERS``, default all), with ρ against exact TracIn; ``after_model(rows)`` is called after each model."""
    rows = []
    workdir = tempfile.mkdtemp(prefix="gradindex-speed-")
    for key, setting in _settings(mode).items():
        if only and key not in only:
            continue
        workload = setting.make(setting.n_train, setting.n_test)
        n = len(workload.train)
        checkpoint = str(Path(workdir) / f"{key}.pt")
        trained = _train(workload, setting)
        torch.save(trained.state_dict(), checkpoint)
        params = sum(p.numel() for p in trained.parameters())
        del trained
        base = {"model": workload.name, "params": params, "n_train": n}
        log(f"[{key}] {workload.name}: {params:,} parameters, N = {n:,}, k = {k}")
        eval_rows = np.arange(n - min(setting.n_eval, n), n)
        exact = exact_scores(workload, checkpoint, eval_rows) if setting.exact else None

        # the epoch right before and right after the build; the faster is the reference (a busy machine only ever
        # slows a run down, so the faster one is the nearer to the epoch's own cost, and the ratios the harder)
        before = training_epoch(workload, checkpoint, setting.micro_batch)
        row = {**base, "method": "gradindex build (end to end)", "samples_timed": n, "first_build": not rows}
        try:
            with PeakMemory() as memory:
                wall, cpu, (store, task) = gradindex_build(workload, checkpoint, k, workdir)
            row.update(seconds=wall, cpu_s=cpu, peak_mib=memory.peak_mib)
            projection = store.fingerprint.get("projection", {})
            row["note"] = (
                f"in-process gradindex.build, default projection ({projection.get('kind', '?')}), "
                f"{store.dim} dims stored, all {n:,} samples: calibration, featurizing, hashing, writing included"
            )
            if exact is not None:
                row["spearman"], row["spearman_per_query"] = _spearman(exact, gradindex_scores(store, task, eval_rows))
            del store, task
        except Exception as error:
            row.update(status="failed", note=f"{type(error).__name__}: {error}"[:300])
            log(f"  gradindex build failed: {type(error).__name__}: {error}")
            traceback.print_exc()
        after = training_epoch(workload, checkpoint, setting.micro_batch)
        epoch = min(before, after)
        micro = f" in micro-batches of {setting.micro_batch}" if setting.micro_batch < 256 else ""
        rows.append(
            {
                **base,
                "method": "training epoch (reference)",
                "seconds": epoch[0],
                "cpu_s": epoch[1],
                "x_epoch": 1.0,
                "x_epoch_cpu": 1.0,
                "samples_timed": n,
                "epochs_s": [before[0], after[0]],
                "note": f"SGD, batch 256{micro}: forward + backward + update over all {n:,} samples; the faster of "
                f"the epochs right before and after the build ({before[0]:.3g} s, {after[0]:.3g} s)",
            }
        )
        log(f"  training epoch: {before[0]:.2f} s before, {after[0]:.2f} s after the build")
        if row.get("seconds"):
            row.update(x_epoch=row["seconds"] / epoch[0], x_epoch_cpu=row["cpu_s"] / epoch[1])
            if key in TARGETS:
                row["target_x_epoch"] = TARGETS[key]
                row["meets_target"] = "yes" if row["x_epoch"] <= TARGETS[key] else "no"
            log(
                f"  gradindex build: {row['seconds']:.2f} s = {row['x_epoch']:.2f}x the epoch "
                f"({row['x_epoch_cpu']:.2f}x in CPU time), ρ {row.get('spearman_per_query')}"
            )
        rows.append(row)
        gradindex_row = row
        shutil.rmtree(Path(workdir) / f"{workload.name}.gradindex", ignore_errors=True)

        for peer_key, prepare in _peers.PEERS.items():
            if peers is not None and peer_key not in peers:
                continue
            row = {**base, "method": peer_key}
            try:
                with PeakMemory() as memory:
                    clock = Clock()
                    runner = prepare(workload, checkpoint, k)
                    setup = clock.since()
                    row["method"] = runner.name
                    found = run_peer(runner, workload, setting)
                fixed = found.get("fixed_s", (0.0, 0.0))
                wall, cpu = (
                    setup[i] + fixed[i] + n * found["timed_s"][i] / found["timed"] for i in (0, 1)
                )  # seconds for all N
                row.update(
                    seconds=wall,
                    cpu_s=cpu,
                    x_epoch=wall / epoch[0],
                    x_epoch_cpu=cpu / epoch[1],
                    samples_timed=found["timed"],
                    peak_mib=memory.peak_mib,
                    note=runner.note,
                )
                if found.get("estimated"):
                    row["note"] = f"one batch of {found['timed']} estimated, seconds for N extrapolated; " + row["note"]
                elif found["timed"] < n:
                    row["note"] = f"seconds for N extrapolated from {found['timed']:,} samples; " + row["note"]
                if exact is not None and found["scores"] is not None:
                    row["spearman"], row["spearman_per_query"] = _spearman(exact, found["scores"])
                elif exact is not None and not found.get("estimated"):
                    row["note"] = f"ρ not measured (its time cap came before the {len(eval_rows)} rows); " + row["note"]
                log(
                    f"  {row['method']}: {wall:.1f} s for N ({found['timed']} timed; {row['x_epoch']:.3g}x the "
                    f"epoch), ρ {row.get('spearman_per_query')}"
                )
            except _peers.Unavailable as reason:
                row.update(status="not run", note=str(reason))
                log(f"  {peer_key}: not run ({reason})")
            except Exception as error:  # a peer that fails here is recorded, not hidden
                row.update(status="failed", note=f"{type(error).__name__}: {error}"[:300])
                log(f"  {peer_key}: failed ({type(error).__name__}: {error})")
                if os.environ.get("GRADINDEX_BENCH_DEBUG"):
                    traceback.print_exc()
            rows.append(row)
            gc.collect()
        _compare(rows, workload.name, gradindex_row)
        if after_model is not None:
            after_model(rows)
    shutil.rmtree(workdir, ignore_errors=True)
    return rows


def _train(workload: Workload, setting: Setting) -> torch.nn.Module:
    torch.manual_seed(0)
    model = workload.make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=setting.lr)
    inputs, targets = workload.train.tensors
    generator = torch.Generator().manual_seed(0)
    for _ in range(setting.steps):
        rows = torch.randint(0, len(inputs), (min(setting.train_batch, len(inputs)),), generator=generator)
        optimizer.zero_grad()
        workload.loss(model, (inputs[rows], targets[rows])).mean().backward()
        optimizer.step()
    return model.eval()


def _compare(rows: list[dict], model: str, mine: dict) -> None:
    """gradindex's build time beside each peer's (``x_gradindex``: the peer's seconds over gradindex's), and the
    fastest peer whose per-query ρ is at least gradindex's (speed counts only at equal or better quality)."""
    if not mine.get("seconds"):
        return
    peers = [
        row
        for row in rows
        if row["model"] == model and row.get("seconds") and not row["method"].startswith(("gradindex", "training"))
    ]
    for row in peers:
        row["x_gradindex"] = row["seconds"] / mine["seconds"]
    if not peers:
        mine["fastest_peer_at_quality"] = "no peer ran"
        return
    quality = mine.get("spearman_per_query")
    equal = [row for row in peers if quality is not None and row.get("spearman_per_query", -2) >= quality]
    if equal:
        best = min(equal, key=lambda row: row["seconds"])
        mine["fastest_peer_at_quality"] = best["method"]
        mine["x_gradindex"] = best["seconds"] / mine["seconds"]
    else:
        mine["fastest_peer_at_quality"] = "none as accurate"


# ---- scaling --------------------------------------------------------------------------------------


def scaling(mode: str, k: int, table: list[dict] | None = None, log=print) -> list[dict]:
    """gradindex build seconds beside the training epoch's against N and against the hidden width; a point the table
    already measured (same model, same N) is taken from it, unless its build was the process's first (then it is
    measured again, warm, beside the table's first-build figure)."""
    sizes, widths, width_n = _scaling_settings(mode)
    tiny_widths = (32, 32) if mode == "tiny" else (512, 512)
    points = [("N", n, lambda n=n: deep_mlp_workload(n, 4, tiny_widths)) for n in sizes]
    points += [("width", h, lambda h=h: deep_mlp_workload(width_n, 4, (h, h), side=32)) for h in widths]
    rows = []
    workdir = tempfile.mkdtemp(prefix="gradindex-scaling-")
    for axis, value, make in points:
        workload = make()
        measured = {
            row["method"]: row
            for row in table or []
            if row["model"] == workload.name and row["n_train"] == len(workload.train) and row.get("seconds")
        }
        first = measured.get("gradindex build (end to end)", {}).get("first_build", False)
        if "gradindex build (end to end)" in measured and "training epoch (reference)" in measured and not first:
            build, epoch = measured["gradindex build (end to end)"], measured["training epoch (reference)"]
            rows.append(
                {
                    "axis": axis,
                    "value": value,
                    "model": workload.name,
                    "params": build["params"],
                    "n_train": build["n_train"],
                    "build_s": build["seconds"],
                    "epoch_s": epoch["seconds"],
                    "x_epoch": build["x_epoch"],
                    "x_epoch_cpu": build["x_epoch_cpu"],
                    "note": "the table's row",
                }
            )
            continue
        setting = Setting(None, 0, 0, 0, 20 if mode != "tiny" else 2, 1e-3, 128, 0, 0)
        checkpoint = str(Path(workdir) / "c.pt")
        model = _train(workload, setting)
        torch.save(model.state_dict(), checkpoint)
        params = sum(p.numel() for p in model.parameters())
        before = training_epoch(workload, checkpoint)
        build_s, build_cpu, _ = gradindex_build(workload, checkpoint, k, workdir)
        after = training_epoch(workload, checkpoint)
        epoch_s, epoch_cpu = min(before, after)
        shutil.rmtree(Path(workdir) / f"{workload.name}.gradindex", ignore_errors=True)
        rows.append(
            {
                "axis": axis,
                "value": value,
                "model": workload.name,
                "params": params,
                "n_train": len(workload.train),
                "build_s": build_s,
                "epoch_s": epoch_s,
                "x_epoch": build_s / epoch_s,
                "x_epoch_cpu": build_cpu / epoch_cpu,
            }
        )
        log(f"[scaling] {axis} = {value}: build {build_s:.2f} s, epoch {epoch_s:.2f} s ({build_s / epoch_s:.2f}x)")
    shutil.rmtree(workdir, ignore_errors=True)
    return rows


# ---- query ----------------------------------------------------------------------------------------


def query(mode: str, log=print) -> list[dict]:
    import faiss

    from gradindex.search import ExactIndex, search_blocks

    sizes = {"tiny": [2_000], "quick": [100_000]}.get(mode, [100_000, 300_000])
    dim, k = (128, 10) if mode == "tiny" else (1024, 10)
    query_counts = [10] if mode == "tiny" else [10, 100]
    rows = []
    rng = np.random.default_rng(0)
    for n_samples in sizes:
        stored = np.empty((n_samples, dim), dtype=np.float16)
        for start in range(0, n_samples, 50_000):
            stored[start : start + 50_000] = rng.standard_normal(
                (min(50_000, n_samples - start), dim), dtype=np.float32
            )
        dense = stored.astype(np.float32)
        index = ExactIndex(dim, use_gpu=False)
        index.add(stored)
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
                for _ in range(3 if mode != "tiny" else 1):
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
        stored = dense = flat = index = None  # free this size's arrays before the next one
        gc.collect()
    return rows


# ---- report ---------------------------------------------------------------------------------------


def _plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = payload["build"]
    models = list(dict.fromkeys(row["model"] for row in table))
    scaling_rows = payload["scaling"]
    columns = max(2, (len(models) + 3) // 2)
    fig, grid = plt.subplots(2, columns, figsize=(5.2 * columns, 9.0))
    axes = list(grid.ravel())
    for axis in axes[len(models) : -2]:
        axis.set_visible(False)
    for axis, model in zip(axes, models):
        ran = [row for row in table if row["model"] == model and row.get("seconds")]
        labels = [row["method"].replace(" (", "\n(") for row in ran]
        colors = [
            "tab:green"
            if row["method"].startswith("gradindex")
            else "tab:gray"
            if row["method"].startswith("training")
            else "tab:blue"
            for row in ran
        ]
        axis.barh(labels, [row["seconds"] for row in ran], color=colors)
        axis.set_xscale("log")
        axis.set_title(f"{model}\nseconds to index N = {ran[0]['n_train']:,}" if ran else model, fontsize=9)
        axis.tick_params(axis="y", labelsize=7)
        for position, row in enumerate(ran):
            if row.get("spearman_per_query") is not None:
                axis.text(row["seconds"], position, f" ρ={row['spearman_per_query']:.2f}", va="center", fontsize=7)
    for axis, which, label in ((axes[-2], "N", "training samples N"), (axes[-1], "width", "hidden width h")):
        points = [row for row in scaling_rows if row["axis"] == which]
        if points:
            axis.plot([r["value"] for r in points], [r["build_s"] for r in points], marker="o", label="gradindex build")
            axis.plot([r["value"] for r in points], [r["epoch_s"] for r in points], marker="s", label="training epoch")
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_xlabel(label)
            axis.set_ylabel("seconds")
            inputs = points[0]["model"].split("-")[1]
            title = (
                f"MLP {inputs}-h-h-10, N = {points[0]['n_train']:,}" if which == "width" else f"MLP {inputs}-512-512-10"
            )
            axis.set_title(f"build vs epoch: {title}", fontsize=9)
            axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _markdown(payload: dict) -> str:
    info = payload["machine"]
    table = payload["build"]
    lines = [
        "## Build speed: what indexing costs, end to end (`benchmarks/speed`)",
        "",
        f"Command: `{payload['command']}` ({payload['wall_s'] / 60:.0f} min). Machine: {info['cpu']}, "
        f"{info['cores']} cores shared with other jobs (load average at start {payload['load_average']}), "
        f"torch threads {payload.get('threads')}, "
        f"{info['memory_gib']} GiB, torch {info['torch']}, faiss {info['faiss']}, CUDA {info['cuda']}; peers: "
        + ", ".join(f"{name} {version}" for name, version in payload["peers"].items())
        + ". Every figure is from this one run, side by side."
        + (f" {payload['note']}" if payload.get("note") else ""),
        "",
        "`seconds` is what indexing all N training samples costs: for gradindex, one in-process `gradindex.build` "
        f"call (one checkpoint, k = {payload['k']}, the default projection: kron calibration, featurizing, sample "
        "hashing, writing and finalizing the store all inside), measured on all N; for a peer, its build or scoring "
        "path over the same N (measured, or extrapolated from the rows it did in its time cap, as the note says; "
        "kronfluence and Bergson's build path are timed as a whole on the rows named, fit included). `x_epoch` is "
        "seconds over one training epoch (SGD, batch 256, all N samples) of the same model (the faster of the "
        "epochs run right before and right after gradindex's build, `x_epoch_cpu` the same in process CPU "
        "seconds); `target_x_epoch` is "
        "issue 16's bound. `x_gradindex` is a peer's seconds over gradindex's (on gradindex's row: that of the "
        "fastest peer whose per-query ρ is at least gradindex's). ρ: Spearman of the method's scores (test queries "
        "× the last training rows) with exact TracIn (unprojected per-sample "
        "gradients), per query (averaged) and flattened; kron calibrates on the first 256 rows, so where N > 256 the "
        "scored rows are ones its calibration never saw. kronfluence computes EK-FAC influence functions, not "
        "TracIn: its ρ is agreement with another quantity.",
        "",
        "Data: 28×28 digits (sklearn's 8×8, upsampled and jittered; 32×32 for the wide MLP's 1,024 inputs); the LM "
        "is a Llama-style transformers model (nn.Linear everywhere, untied head) on structured synthetic text "
        "(motifs chained by a sparse Markov chain), context 128. Checkpoints are briefly trained with Adam first.",
        "",
    ]
    summary = []
    for row in table:
        if row["method"].startswith("gradindex") and row.get("seconds"):
            target = (
                f" (target ≤ {row['target_x_epoch']}×: {'met' if row['meets_target'] == 'yes' else 'missed'})"
                if row.get("target_x_epoch")
                else ""
            )
            x = row.get("x_gradindex")
            versus = (
                f"; {x:.3g}× faster than {row['fastest_peer_at_quality']}, the fastest peer at equal or better "
                "per-query ρ"
                if x and x >= 1
                else f"; {1 / x:.3g}× slower than {row['fastest_peer_at_quality']}, the fastest peer at equal or "
                "better per-query ρ"
                if x
                else f"; {row.get('fastest_peer_at_quality', 'no peer ran')} at equal or better per-query ρ"
            )
            warm = [
                point
                for point in payload.get("scaling") or []
                if row.get("first_build") and (point["model"], point["n_train"]) == (row["model"], row["n_train"])
            ]
            summary.append(
                f"**{row['model']}** (N = {row['n_train']:,}): {row['seconds']:.1f} s = {row['x_epoch']:.2f}× a "
                f"training epoch"
                + (target if row.get("target_x_epoch") else "")
                + (
                    f" as the process's first build (imports and first calls included); "
                    f"{warm[0]['build_s']:.2f} s = {warm[0]['x_epoch']:.2f}× as a later one"
                    if warm
                    else ""
                )
                + (
                    f", per-query ρ {row['spearman_per_query']:.3f}"
                    if row.get("spearman_per_query") is not None
                    else ""
                )
                + versus
            )
    if summary:
        lines += ["gradindex build, end to end, per checkpoint:", ""] + [f"- {item}" for item in summary] + [""]
    columns = [
        "model",
        "params",
        "n_train",
        "method",
        "seconds",
        "x_epoch",
        "x_epoch_cpu",
        "target_x_epoch",
        "x_gradindex",
        "samples_timed",
        "spearman_per_query",
        "spearman",
        "peak_mib",
        "status",
        "note",
    ]
    lines.append(markdown_table(table, columns))
    if payload.get("scaling"):
        lines += [
            "",
            "Scaling of the end-to-end build (k = 1024, one checkpoint) beside the training epoch: against N (MLP "
            "784-512-512-10) and against the hidden width h (MLP 1024-h-h-10 on a fixed N). These are later builds "
            "in one process (its imports and first-call costs already paid), as the table's rows are for every "
            "model but the first one a process builds (the table's first model is measured again here, warm):",
            "",
            markdown_table(
                payload["scaling"],
                ["axis", "value", "model", "params", "n_train", "build_s", "epoch_s", "x_epoch", "x_epoch_cpu", "note"],
            ),
        ]
    if payload.get("query"):
        lines += [
            "",
            "Exact top-10 search, float16 vectors (as a store holds them); time per query batch, best of 3:",
            "",
            markdown_table(
                payload["query"], ["n_samples", "queries", "method", "seconds", "queries_per_s", "x_roofline_time"]
            ),
        ]
    lines += ["", f"![speed](results/{payload['plot']})"]
    return "\n".join(lines)


def _peer_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("captum", "traker", "dattri", "kronfluence", "bergson"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def run(
    tiny: bool = False,
    quick: bool = False,
    k: int | None = None,
    models: list[str] | None = None,
    peers: list[str] | None = None,
    with_query: bool = False,
    with_scaling: bool = True,
    write: bool = True,
    log=print,
) -> dict:
    """Run the benchmark and return its payload (written to ``benchmarks/results`` and RESULTS.md with ``write``;
    a ``tiny`` or ``quick`` run never touches RESULTS.md)."""
    mode = "tiny" if tiny else "quick" if quick else "full"
    torch.manual_seed(0)
    k = k or (32 if tiny else 1024)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    started = time.perf_counter()
    payload: dict = {
        "command": COMMAND
        + {"tiny": " --tiny", "quick": " --quick", "full": ""}[mode]
        + (f" --models {' '.join(models)}" if models else "")
        + ("" if with_scaling else " --no-scaling")
        + (" --query" if with_query else "")
        + (f" --threads {torch.get_num_threads()}" if torch.get_num_threads() != (os.cpu_count() or 1) else ""),
        "mode": mode,
        "k": k,
        "machine": machine(),
        "peers": _peer_versions(),
        "load_average": [round(value, 2) for value in load] if load else None,
        "threads": torch.get_num_threads(),
        "build": [],
        "scaling": [],
        "query": [],
    }
    name = {"tiny": "speed-tiny", "quick": "speed-quick", "full": "speed"}[mode]

    def partial(rows: list[dict]) -> None:  # what is done so far, should the run be stopped
        if write:
            save_json(name, {**payload, "build": rows, "partial": True})

    payload["build"] = build_table(mode, k, models, peers, log=log, after_model=partial)
    if with_scaling:
        payload["scaling"] = scaling(mode, k, payload["build"], log=log)
    if with_query:
        payload["query"] = query(mode, log=log)
    payload["wall_s"] = time.perf_counter() - started
    if write:
        payload["plot"] = f"{name}.png"
        save_json(name, payload)
        _plot(payload, RESULTS_DIR / payload["plot"])
        if mode == "full":
            update_section("speed", _markdown(payload))
    return payload


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--tiny", action="store_true", help="seconds, tiny sizes (what the test suite runs)")
    sizes.add_argument("--quick", action="store_true", help="minutes, a tenth of the sizes (development)")
    parser.add_argument("--k", type=int, help="projection dim per checkpoint (default 1024; 32 with --tiny)")
    parser.add_argument("--models", nargs="*", choices=["mlp", "cnn", "wide-mlp", "lm"], help="only these models")
    parser.add_argument("--query", action="store_true", help="also time exact search (N float16 vectors, d = 1024)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling curves")
    parser.add_argument("--no-write", action="store_true", help="print only; write no results")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads for everything timed (default: one per core); 1 on a machine shared with other jobs, "
        "where threads that wait on each other at every small kernel turn others' load into noise",
    )
    args = parser.parse_args(argv)
    # peers' progress bars (dattri: one per batch) would flood the log; set here, not in run(), which the
    # test suite calls in-process and whose environment later tests share
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    payload = run(
        tiny=args.tiny,
        quick=args.quick,
        k=args.k,
        models=args.models,
        with_query=args.query,
        with_scaling=not args.no_scaling,
        write=not args.no_write,
    )
    print(
        json.dumps({"results": str(RESULTS_DIR / ("speed-tiny.json" if args.tiny else "speed.json"))}), file=sys.stderr
    )
    del payload
