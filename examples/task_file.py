"""A task file, as `--task examples/task_file.py:task` names it: sklearn's 8x8 digits, written from scratch.

    gradindex build --task examples/task_file.py:task --checkpoint ckpt.pt:0.05 -o digits.gradindex

A task file is any Python file with a function returning a ``gradindex.Task``. This one shows the
optional parts too: sample ids that travel into every result table, a loss written out (it equals the
default, per-sample cross-entropy), and a validation split beside the default ``test`` split. Options
of the factory (``flip_fraction``) make noisy variants for experiments.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import TensorDataset

import gradindex


def model() -> nn.Module:
    """``[B, 64] -> [B, 10]`` logits; the weights come from the checkpoints."""
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def per_sample_loss(model: nn.Module, batch) -> torch.Tensor:
    """``[B]``: one loss per sample, never the mean (gradindex differentiates each sample alone)."""
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs), targets, reduction="none")


def task(flip_fraction: float = 0.0, seed: int = 0) -> gradindex.Task:
    digits = load_digits()
    pixels = (digits.data / 16.0).astype(np.float32)  # 8x8 images as flat 64-vectors: the report draws them as images
    labels = digits.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        pixels, labels, test_size=0.3, random_state=seed, stratify=labels
    )
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest)
    if flip_fraction:
        rng = np.random.default_rng(seed)
        flipped = rng.choice(len(y_train), size=int(round(flip_fraction * len(y_train))), replace=False)
        y_train = y_train.copy()
        y_train[flipped] = (y_train[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    return gradindex.Task(
        model=model,
        train=TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)),
        test=TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test)),
        queries={"val": TensorDataset(torch.from_numpy(x_val), torch.from_numpy(y_val))},
        loss=per_sample_loss,
        sample_ids=[f"digit-{index:04d}" for index in range(len(y_train))],
        name="digits-from-scratch",
    )
