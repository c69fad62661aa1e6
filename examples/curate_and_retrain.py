"""Worked example: clean a noisy training set with gradindex and retrain on what is kept.

    python examples/curate_and_retrain.py [--workdir runs/curate] [--quick]

sklearn's digits with 10% of the training labels flipped. A small MLP is trained (4 checkpoints) and a
TracIn-CP store built from them. Then:

1. ``curate(drop_top="10%")`` drops the 10% highest self-influence samples; the model is retrained on
   the rest and compared, on the clean test set, with training on everything, on a random 90%, and on
   the 90% an oracle that knows the flipped labels would keep;
2. ``curate(select="10%", samples=<test 3s>)`` keeps the 10% of training samples most helpful for the
   test digits labelled 3 (LESS-style summed influence) and shows which classes it chose.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

import gradindex
from gradindex.tasks import digits_with_info
from gradindex.training import TrainConfig, evaluate, train

TASK_FILE = "import gradindex.tasks\n\ndef task():\n    return gradindex.tasks.digits(flip_fraction=0.1, seed=0)\n"


def _accuracy_on_subset(task: gradindex.Task, keep: np.ndarray, config: TrainConfig, directory: Path) -> float:
    inputs, targets = task.train.tensors
    mask = torch.from_numpy(keep)
    subset = gradindex.Task(
        model=task.model, train=TensorDataset(inputs[mask], targets[mask]), test=task.test, name=task.name
    )
    checkpoints = train(subset, config, directory)
    return evaluate(subset, checkpoints[-1])["accuracy"]


def main(workdir: str | Path = "runs/curate", *, quick: bool = False, echo=print) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "task.py").write_text(TASK_FILE)
    task, noise = digits_with_info(flip_fraction=0.1, seed=0)
    config = TrainConfig(epochs=5 if quick else 30, lr=0.05, n_checkpoints=2 if quick else 4)
    checkpoints = train(task, config, workdir / "checkpoints")
    store = gradindex.build(
        f"{workdir / 'task.py'}:task",
        [f"{c.path}:{c.lr}" for c in checkpoints],
        workdir / "digits.gradindex",
        proj_dim=128 if quick else 1024,
        overwrite=True,
    )
    retrain = TrainConfig(epochs=3, lr=0.05, n_checkpoints=1) if quick else config

    # 1. drop the most suspicious 10% and retrain
    table = gradindex.curate(store, drop_top="10%")
    keep = table.column("keep").to_numpy(zero_copy_only=False)
    dropped = np.flatnonzero(~keep)
    precision = np.isin(dropped, noise.flipped_rows).mean()
    n_samples = len(keep)
    rng = np.random.default_rng(0)
    random_keep = np.ones(n_samples, dtype=bool)
    random_keep[rng.choice(n_samples, size=len(dropped), replace=False)] = False
    oracle_keep = ~noise.flipped_mask
    accuracies = {}
    for name, mask in (
        ("all samples", np.ones(n_samples, dtype=bool)),
        ("random 90%", random_keep),
        ("gradindex: drop top 10% self-influence", keep),
        ("oracle: drop the flipped labels", oracle_keep),
    ):
        accuracies[name] = _accuracy_on_subset(
            task, mask, retrain, workdir / "retrain" / name.split(":")[0].replace(" ", "-")
        )
    echo(f"dropped {len(dropped)} samples; {precision:.0%} of them had flipped labels")
    echo("test accuracy after retraining:")
    for name, accuracy in accuracies.items():
        echo(f"  {name:<40} {accuracy:.3f}")

    # 2. the 10% of training data most helpful for the test digits labelled 3
    test_labels = task.test.tensors[1].numpy()
    threes = np.flatnonzero(test_labels == 3).tolist()
    helpful = gradindex.curate(store, select="10%", split="test", samples=threes)
    chosen = helpful.filter(helpful.column("keep"))
    classes = np.bincount(noise.clean_labels[chosen.column("row").to_numpy()], minlength=10)
    share_of_threes = classes[3] / classes.sum()
    echo(
        f"the {chosen.num_rows} training samples most helpful for {len(threes)} test 3s are {share_of_threes:.0%} "
        "threes "
        f"(by true class: {classes.tolist()})"
    )
    return {
        "precision": float(precision),
        "accuracies": accuracies,
        "share_of_threes": float(share_of_threes),
        "n_dropped": len(dropped),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/curate")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and a smaller projection (seconds)")
    args = parser.parse_args()
    main(args.workdir, quick=args.quick)
