"""Build throughput: samples/s of `gradindex.build` per projection, beside a plain training step.

python -m benchmarks.build_throughput            # full run (a few minutes on 2 cores)
python -m benchmarks.build_throughput --tiny     # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

import gradindex
from benchmarks._report import machine, markdown_table, save_json, update_section
from gradindex.projection import PROJECTION_KINDS as _KINDS


def _mnist_like(n_samples: int) -> gradindex.Task:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(n_samples, 784, generator=generator)
    targets = torch.randint(0, 10, (n_samples,), generator=generator)
    return gradindex.Task(
        model=lambda: nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)),
        train=TensorDataset(inputs, targets),
        name="mlp-784-256-10",
    )


def _training_step_rate(task: gradindex.Task, batch_size: int = 256, repeats: int = 3) -> float:
    """Samples/s of one ordinary SGD step (batched forward + backward + update): the physical reference."""
    model = task.model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs, targets = task.train.tensors
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for start in range(0, len(inputs), batch_size):
            optimizer.zero_grad()
            nn.functional.cross_entropy(
                model(inputs[start : start + batch_size]), targets[start : start + batch_size]
            ).backward()
            optimizer.step()
        best = min(best, time.perf_counter() - started)
    return len(inputs) / best


def _checkpoints(task: gradindex.Task, directory: Path, count: int) -> list[str]:
    specs = []
    for position in range(count):
        torch.manual_seed(position)
        path = directory / f"ckpt-{position}.pt"
        torch.save(task.model().state_dict(), path)
        specs.append(f"{path}:0.1")
    return specs


def run(tiny: bool = False) -> dict:
    from gradindex.tasks import digits

    workdir = Path(tempfile.mkdtemp(prefix="gi-bench-build-"))
    kinds = [kind for kind in _KINDS if kind != "none"]
    # the 32k-sample case: kron only (the others take minutes per thousand samples), where fixed costs (calibration,
    # store creation) no longer dominate
    cases = [
        ("digits MLP 64-32-10", digits(), 3, kinds),
        ("MLP 784-256-10", _mnist_like(2048), 3, kinds),
        ("MLP 784-256-10", _mnist_like(32768), 3, ["kron"]),
    ]
    if tiny:  # keeps the code path alive in the test suite; the numbers mean nothing
        cases = [(*cases[0][:3], ["sjlt"])]
    rows = []
    try:
        load = [round(value, 2) for value in os.getloadavg()]
    except OSError:
        load = None
    try:
        for name, task, n_checkpoints, kinds in cases:
            if tiny:
                inputs, targets = task.train.tensors
                task = gradindex.Task(model=task.model, train=TensorDataset(inputs[:64], targets[:64]), name=task.name)
            checkpoints = _checkpoints(task, workdir, n_checkpoints)
            reference = _training_step_rate(task)
            n_params = sum(p.numel() for p in task.model().parameters())
            for kind in (["none"] if n_params <= 5000 and not tiny else []) + kinds:
                proj_dim = 1024
                run_task = task
                if kind in ("rademacher", "gaussian") and n_params > 50_000:
                    # dense JL regenerates a 200k x 1024 matrix per batch past its cache: measure on 128 samples
                    inputs, targets = task.train.tensors
                    run_task = gradindex.Task(
                        model=task.model, train=TensorDataset(inputs[:128], targets[:128]), name=task.name
                    )
                started = time.perf_counter()
                store = gradindex.build(
                    run_task,
                    checkpoints,
                    workdir / f"{kind}.gradindex",
                    projection=kind,
                    proj_dim=proj_dim,
                    overwrite=True,
                    progress=False,
                )
                seconds = time.perf_counter() - started
                rate = store.n_samples / seconds
                rows.append(
                    {
                        "model": name,
                        "params": n_params,
                        "projection": kind,
                        "k": store.dim // n_checkpoints,
                        "checkpoints": n_checkpoints,
                        "samples": store.n_samples,
                        "seconds": round(seconds, 3),
                        "samples_per_s": rate,
                        "train_step_samples_per_s": reference,
                        "train_step_time_ratio": (reference / rate) if reference else None,
                        "per_checkpoint_ratio": (reference / rate / n_checkpoints) if reference else None,
                    }
                )
                print(
                    f"{name:<22} {kind:<11} {rate:>10,.0f} samples/s (training step {reference or float('nan'):,.0f}/s)"
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    payload = {
        "benchmark": "build_throughput",
        "tiny": tiny,
        "machine": machine(),
        "load_average": load,
        "command": "python -m benchmarks.build_throughput" + (" --tiny" if tiny else ""),
        "rows": rows,
    }
    if not tiny:
        save_json("build_throughput", payload)
        update_section("build-throughput", _markdown(payload))
    return payload


def _markdown(payload: dict) -> str:
    return (
        "## Build throughput (issue 2 scaffold)\n\n"
        f"`{payload['command']}` on {payload['machine']['cores']} cores ({payload['machine']['cpu']}), torch "
        f"{payload['machine']['torch']}, "
        f"{payload['machine']['date']}, load average at start {payload['load_average']}.\n"
        "End-to-end `gradindex.build` (calibrate, featurize all checkpoints, hash the samples, write the store), k = "
        "1024 per "
        "checkpoint; `train_step_time_ratio` = how many times slower than one plain SGD epoch over the same samples, "
        "`per_checkpoint_ratio` the same per checkpoint (a build featurizes every sample once per checkpoint). kron "
        "pays a "
        "fixed cost once per build: its calibration on 256 samples per checkpoint (gradient energies, then the pca "
        "sides' "
        "second moments and their eigendecompositions, about 0.7 s for the 784-256-10 MLP's three checkpoints), which "
        "dominates the 2,048-sample row; the 32,768-sample row shows the per-sample rate.\n\n"
        + markdown_table(
            payload["rows"],
            [
                "model",
                "params",
                "projection",
                "k",
                "checkpoints",
                "samples",
                "seconds",
                "samples_per_s",
                "train_step_samples_per_s",
                "train_step_time_ratio",
                "per_checkpoint_ratio",
            ],
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run (results not saved)")
    run(tiny=parser.parse_args().tiny)


if __name__ == "__main__":
    main()
