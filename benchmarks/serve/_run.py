"""The serve benchmark: ten CLI queries through a resident server against ten direct ones (see the package doc)."""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gradindex
from benchmarks._report import machine, markdown_table, save_json, update_section

# the benchmark's task: an MLP on random features stored beside this file (data.pt), so loading it is a file read
_TASK_FILE = '''"""An MLP on stored random features (data.pt beside this file)."""

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import gradindex

HERE = Path(__file__).resolve().parent


def model():
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def task():
    data = torch.load(HERE / "data.pt")
    return gradindex.Task(
        model=model,
        train=TensorDataset(data["x"], data["y"]),
        test=TensorDataset(data["xq"], data["yq"]),
        name="serve-bench-mlp",
    )
'''


def _make_store(workdir: Path, n_train: int) -> tuple[Path, float]:
    """The task file, its data, two checkpoints of a short training, and the store built from them (and its seconds)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 32, generator=generator)
    labels = torch.randint(0, 10, (n_train + 200,), generator=generator)
    inputs = centers[labels] + torch.randn(n_train + 200, 32, generator=generator)
    torch.save(
        {"x": inputs[:n_train], "y": labels[:n_train], "xq": inputs[n_train:], "yq": labels[n_train:]},
        workdir / "data.pt",
    )
    (workdir / "task.py").write_text(_TASK_FILE)
    sys.path.insert(0, str(workdir))
    try:
        import task as bench_task  # the file just written
    finally:
        sys.path.remove(str(workdir))
    torch.manual_seed(0)
    model = bench_task.model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoints = []
    for epoch in range(2):
        for start in range(0, n_train, 64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(
                model(inputs[start : min(start + 64, n_train)]), labels[start : min(start + 64, n_train)]
            )
            loss.backward()
            optimizer.step()
        path = workdir / f"ckpt-{epoch}.pt"
        torch.save(model.state_dict(), path)
        checkpoints.append(f"{path}:0.1")
    sys.modules.pop("task", None)
    store = workdir / "s.gradindex"
    started = time.perf_counter()
    gradindex.build(f"{workdir / 'task.py'}:task", checkpoints, store, progress=False)
    return store, time.perf_counter() - started


def _timed(command: list[str], environment: dict) -> tuple[float, str]:
    """Wall seconds of one process from start to exit, and its stdout."""
    started = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
    return time.perf_counter() - started, done.stdout


def run(tiny: bool = False) -> dict:
    n_train, n_queries, per_query, rounds = (256, 2, 2, 1) if tiny else (4096, 10, 5, 3)
    workdir = Path(tempfile.mkdtemp(prefix="gi-bench-serve-"))
    script = str(Path(sys.executable).with_name("gradindex"))
    # OpenMP threads that wait passively: spinning ones bill CPU for the machine's other work, unevenly
    environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    environment.pop("GRADINDEX_TOKEN", None)
    load_before = os.getloadavg()
    server = None
    try:
        store, build_seconds = _make_store(workdir, n_train)
        layout = gradindex.open_store(store).layout
        started = time.perf_counter()
        server = subprocess.Popen(
            [script, "serve", str(store), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        url = server.stdout.readline().strip()
        server_start = time.perf_counter() - started
        if not url.startswith("grpc://127.0.0.1:"):
            raise RuntimeError(f"gradindex serve printed {url!r} first: {server.stderr.read()[-2000:]}")
        samples = [f"{first}-{first + per_query - 1}" for first in range(0, n_queries * per_query, per_query)]
        tail = ["-k", "10", "--format", "jsonl"]
        direct_rounds, served_rounds, equal = [], [], True
        for _ in range(rounds):
            totals = {"direct": 0.0, "served": 0.0}
            outputs: dict[str, list[str]] = {"direct": [], "served": []}
            for picked in samples:
                seconds, output = _timed([script, "query", str(store), "--samples", picked, *tail], environment)
                totals["direct"] += seconds
                outputs["direct"].append(output)
            for picked in samples:
                seconds, output = _timed([script, "query", "--server", url, "--samples", picked, *tail], environment)
                totals["served"] += seconds
                outputs["served"].append(output)
            # every answer: the server's output byte for byte the direct one's
            equal = equal and outputs["served"] == outputs["direct"]
            equal = equal and all(len(output.splitlines()) == 10 * per_query for output in outputs["direct"])
            direct_rounds.append(totals["direct"])
            served_rounds.append(totals["served"])
        with gradindex.connect(url) as client:
            started = time.perf_counter()
            for picked in samples:
                client.query(picked, k=10)
            client_seconds = time.perf_counter() - started
            info = client.info()
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(60)
        server = None
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    direct_best, served_best = min(direct_rounds), min(served_rounds)
    rows = [
        {
            "way": f"{n_queries} x gradindex query STORE --samples ... (direct)",
            "best_s": direct_best,
            "median_s": statistics.median(direct_rounds),
            "per_query_s": direct_best / n_queries,
        },
        {
            "way": f"{n_queries} x gradindex query --server URL --samples ...",
            "best_s": served_best,
            "median_s": statistics.median(served_rounds),
            "per_query_s": served_best / n_queries,
        },
        {
            "way": f"{n_queries} x Client.query in one Python process (gradindex.connect)",
            "best_s": client_seconds,
            "median_s": client_seconds,
            "per_query_s": client_seconds / n_queries,
        },
    ]
    ratio = served_best / direct_best
    command = "nice -n 10 python -m benchmarks.serve" + (" --tiny" if tiny else "")
    for row in rows:
        print(f"{row['way']:<75} best {row['best_s']:.2f}s ({row['per_query_s']:.3f}s a query)")
    print(f"served / direct: {ratio:.3f} (target <= 0.25); answers equal: {equal}; server start {server_start:.2f}s")
    payload = {
        "benchmark": "serve",
        "tiny": tiny,
        "machine": machine(),
        "command": command,
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "n_train": n_train,
        "dim": layout.dim,
        "dtype": layout.dtype,
        "n_queries": n_queries,
        "samples_per_query": per_query,
        "rounds": rounds,
        "build_seconds": build_seconds,
        "server_start_seconds": server_start,
        "server_search": info["search"],
        "server_exit_code": exit_code,
        "answers_equal": equal,
        "direct_rounds_s": direct_rounds,
        "served_rounds_s": served_rounds,
        "served_vs_direct": ratio,
        "served_with_start_vs_direct": (served_best + server_start) / direct_best,
        "rows": rows,
    }
    if not tiny:
        save_json("serve", payload)
        info = payload["machine"]
        body = (
            "## Serving (`benchmarks/serve`, issue 18)\n\n"
            f"`{command}` on {info['cores']} cores ({info['cpu']}), {info['date']}, shared with other work (load "
            f"average {load_before[0]:.2f} before, {load_after[0]:.2f} after). A task file written for the run (an "
            f"MLP on random features, {n_train:,} training rows, two checkpoints), built with the default settings "
            f"(d = {layout.dim} {layout.dtype}). `gradindex serve STORE --port 0` printed its URL first after "
            f"{server_start:.2f} s (paid once, not in the totals); then {n_queries} CLI processes each way, "
            f"{per_query} test samples each, `-k 10 --format jsonl`, each timed from start to exit, best of "
            f"{rounds} rounds (the two sides alternating). Every served output is byte-identical to the direct one: "
            f"{equal}. Target: served ≤ 0.25× direct.\n\n"
            + markdown_table(rows, ["way", "best_s", "median_s", "per_query_s"])
            + f"\n\n**served / direct: {ratio:.3f}** ({(served_best + server_start) / direct_best:.3f} with the "
            "server's start counted). The client process imports neither torch nor faiss; the server featurizes the "
            "query samples with the task, checkpoints and featurizer it loaded once and searches the vectors it "
            "holds in an exact index.\n"
        )
        update_section("serve", body)
    return payload
