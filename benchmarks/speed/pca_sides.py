"""Experiment (not a feature): kron with data-dependent side matrices (PCA of each layer's inputs and output
gradients) against the shipped random (orthogonal) sides, Spearman of projected vs exact TracIn scores at k = 1024.

    python -m benchmarks.speed.pca_sides            # the test suite's MLP, CNN and 2-layer LM, 3 seeds each

The PCA sides are the top-k eigenvectors of Σ a aᵀ (inputs, with the bias column) and Σ g gᵀ (output gradients)
over the training set at the checkpoint, in the same per-layer plan (k_in × k_out) the build would use. They are
data-dependent, so shipping them needs the matrices persisted in the store (``transforms/``) and read back by
queries, resumed builds and other workers, never recomputed (eigenvectors of near-equal eigenvalues are not
reproducible across machines). Prints one line per model and mode.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from gradindex.checkpoints import parse_checkpoints
from gradindex.featurize import TracInFeaturizer, load_checkpoints
from gradindex.featurize._kron import _sides
from gradindex.project import ProjectionSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "featurize"))
import kron_models  # noqa: E402  (the test suite's models)

SETTINGS = {  # the sizes and training steps tests/featurize/test_kron.py uses
    "mlp": (lambda: kron_models.mnist_like_task("mlp", n_train=120, n_test=8), 100),
    "cnn": (lambda: kron_models.mnist_like_task("cnn", n_train=80, n_test=6), 40),
    "lm": (lambda: kron_models.task("lm", n_train=60, n_test=6), 60),
}


def _pca_sides(featurizer: TracInFeaturizer, train: tuple, state: dict) -> None:
    kron = featurizer.kron
    calls = kron._forward_backward(train, state)
    for plan in kron.plan.layers:
        for inputs, grad in calls.get(plan.layer.name, []):
            a, g = _sides(plan.layer.kind, kron.modules[plan.layer.name], inputs, grad, len(plan.layer.params) > 1)
            for side, x, k, width in (("in", a, plan.k_in, plan.layer.in_dim), ("out", g, plan.k_out, plan.layer.out_dim)):
                if k >= width:
                    continue
                if plan.layer.kind == "embedding" and side == "in":
                    x = torch.nn.functional.one_hot(x.long(), width).float()
                x = x.reshape(-1, x.shape[-1]).double()
                _, vectors = torch.linalg.eigh(x.T @ x)
                kron._matrices[(0, plan.layer.name, side)] = vectors[:, -k:].float().contiguous()


def main() -> None:
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="gi-pca-sides-"))
    for name, (make_task, steps) in SETTINGS.items():
        task = make_task()
        checkpoint = kron_models.trained_checkpoint(task, folder / f"{name}.pt", steps=steps)
        loaded = load_checkpoints(task, parse_checkpoints([checkpoint]), torch.device("cpu"))
        train, test = task.train.tensors, task.test.tensors
        exact_featurizer = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="none"))
        exact = (exact_featurizer.featurize(test) @ exact_featurizer.featurize(train).T).numpy()
        for mode in ("random", "pca"):
            flat, per_query = [], []
            for seed in range(3):
                featurizer = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="kron", dim=1024, seed=seed))
                if mode == "pca":
                    _pca_sides(featurizer, train, loaded[0].state)
                scores = (featurizer.featurize(test) @ featurizer.featurize(train).T).numpy()
                flat.append(spearmanr(exact.ravel(), scores.ravel()).statistic)
                per_query.append(np.mean([spearmanr(exact[q], scores[q]).statistic for q in range(len(scores))]))
            print(f"{name:4s} {mode:6s} dim {featurizer.dim}: Spearman flat min/mean {min(flat):.3f}/{np.mean(flat):.3f}, "
                  f"per query min/mean {min(per_query):.3f}/{np.mean(per_query):.3f}", flush=True)


if __name__ == "__main__":
    main()
