"""Experiment behind the default ``--kron-sides pca``: Spearman of kron-projected vs exact TracIn scores at k = 1024
with seeded orthogonal sides, pca sides (the shipped ones: gradient-energy-weighted second moments of each side over
the 256 calibration samples; wide sides from a seeded sketch, see ``gradindex.projection``' ``SideSketch``) and
unweighted pca sides (plain Σ a aᵀ, Σ g gᵀ).

    python -m benchmarks.speed.pca_sides                 # test-suite models and benchmark workloads, 3 seeds
    python -m benchmarks.speed.pca_sides --only bench    # only the benchmark workloads

Test-suite models (``tests/featurize``): 60-120 training samples, so calibration sees every scored sample.
Benchmark workloads (``benchmarks/speed``): calibration on the first 256 training samples, scores on the last ones
(held out from calibration), the sizes and training steps of ``python -m benchmarks.speed``.
Prints one line per model and mode; writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import gradindex
from benchmarks.speed._models import WORKLOADS
from gradindex.checkpoints import parse_checkpoints
from gradindex.featurize import KronGradients, load_checkpoints
from gradindex.methods import TracInFeaturizer
from gradindex.projection import ProjectionSpec, SideSketch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "featurize"))
import kron_models

TEST_SETTINGS = {  # the sizes and training steps tests/featurize/test_kron.py uses
    "test-mlp": (lambda: kron_models.mnist_like_task("mlp", n_train=120, n_test=8), 100),
    "test-cnn": (lambda: kron_models.mnist_like_task("cnn", n_train=80, n_test=6), 40),
    "test-lm": (lambda: kron_models.task("lm", n_train=60, n_test=6), 60),
}
BENCH_SETTINGS = {  # workload: (n_train, n_eval held out, n_test, steps, lr), as in benchmarks/speed/_run.py
    "mlp": (1024, 512, 16, 300, 1e-3),
    "cnn": (1024, 256, 16, 150, 1e-3),
    "transformer": (512, 64, 6, 40, 3e-3),
}


def _unweighted_moments(self, batch, state, calls, size, moments, keys=None, *args, **kwargs) -> None:
    """``KronGradients._add_moments`` without the other side's energy as weight: plain Σ x xᵀ (token counts), formed
    or sketched as the shipped statistics are; flat groups as shipped."""
    if keys is None:
        keys = {(name, side) for name, side, _, _ in self.pca_shapes()}
    for layer in self._groups[0]:
        for a, g in self._layer_parts(layer, calls):
            for side, width in (("in", layer.in_dim), ("out", layer.out_dim)):
                key = (layer.name, side)
                if key not in keys:
                    continue
                tokens = side == "in" and a.ndim == 2
                x = None if tokens else (a if side == "in" else g).reshape(-1, width)
                target = moments.get(key)
                if isinstance(target, SideSketch):
                    if tokens:
                        target.add_diagonal(a.reshape(-1), torch.ones(a.numel()))
                    else:
                        target.add(x)
                    continue
                if tokens and layer.indicator_in:
                    found = torch.bincount(a.reshape(-1), minlength=width).double()
                elif tokens:
                    found = torch.diag(torch.bincount(a.reshape(-1), minlength=width).double())
                else:
                    found = x.double().T @ x.double()
                moments[key] = found if key not in moments else moments[key] + found
    flat = {key for key in keys if key[1] not in ("in", "out")}
    if flat:
        _shipped_add_moments(self, batch, state, calls, size, moments, flat, *args, **kwargs)


_shipped_add_moments = KronGradients._add_moments


def _compare(name: str, task, checkpoint: str, train_eval: tuple, test: tuple) -> None:
    loaded = load_checkpoints(task, parse_checkpoints([checkpoint]), torch.device("cpu"))
    exact_featurizer = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="none"))
    exact = (exact_featurizer.featurize(test) @ exact_featurizer.featurize(train_eval).T).numpy()
    for mode in ("orthogonal", "pca", "pca-unweighted"):
        flat, per_query = [], []
        KronGradients._add_moments = _unweighted_moments if mode == "pca-unweighted" else _shipped_add_moments
        try:
            for seed in range(3):
                sides = mode.split("-")[0]
                featurizer = TracInFeaturizer(
                    task, loaded, projection=ProjectionSpec(kind="kron", dim=1024, seed=seed, kron_sides=sides)
                )
                scores = (featurizer.featurize(test) @ featurizer.featurize(train_eval).T).numpy()
                flat.append(spearmanr(exact.ravel(), scores.ravel()).statistic)
                per_query.append(np.mean([spearmanr(exact[q], scores[q]).statistic for q in range(len(scores))]))
                if mode != "orthogonal":
                    break  # pca sides do not depend on the seed
        finally:
            KronGradients._add_moments = _shipped_add_moments
        print(
            f"{name:12s} {mode:15s} dim {featurizer.dim}: Spearman flat min/mean {min(flat):.3f}/{np.mean(flat):.3f}, "
            f"per query min/mean {min(per_query):.3f}/{np.mean(per_query):.3f}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", choices=["tests", "bench"], help="only the test-suite models or only the benchmark workloads"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="gi-pca-sides-"))
    if args.only != "bench":
        for name, (make_task, steps) in TEST_SETTINGS.items():
            task = make_task()
            checkpoint = kron_models.trained_checkpoint(task, folder / f"{name}.pt", steps=steps)
            _compare(name, task, checkpoint, task.train.tensors, task.test.tensors)
    if args.only != "tests":
        for name, (n_train, n_eval, n_test, steps, lr) in BENCH_SETTINGS.items():
            workload = WORKLOADS[name](n_train, n_test)
            checkpoint = folder / f"{name}.pt"
            torch.save(workload.train_checkpoint(steps=steps, lr=lr).state_dict(), checkpoint)
            task = gradindex.Task(model=workload.make_model, train=workload.train, loss=workload.loss)
            inputs, targets = workload.train.tensors
            _compare(name, task, f"{checkpoint}:1.0", (inputs[-n_eval:], targets[-n_eval:]), workload.test.tensors)


if __name__ == "__main__":
    main()
