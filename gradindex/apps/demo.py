"""``gradindex demo``: the embedded default, end to end on sklearn's digits with 10% flipped labels."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from gradindex.checkpoints import load_into
from gradindex.pipeline import build, query, self_influence
from gradindex.tasks import digits_with_info
from gradindex.training import TrainConfig, train

__all__ = ["detection_metrics", "run_demo"]

_TASK_FILE = '''"""The demo's task: sklearn digits, 10% of training labels flipped (seed {seed})."""

import gradindex.tasks


def task():
    return gradindex.tasks.digits(flip_fraction=0.1, seed={seed})
'''


def detection_metrics(scores: np.ndarray, flipped: np.ndarray) -> dict:
    """How well ``scores`` (higher = more suspicious) find the flipped rows: AUC, AP, recall in the top 10%/20%."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    order = np.argsort(-scores, kind="stable")
    n_samples = len(scores)
    found = {}
    for fraction in (0.1, 0.2):
        top = order[: int(round(fraction * n_samples))]
        found[f"found_top{int(fraction * 100)}"] = float(flipped[top].sum() / max(1, flipped.sum()))
    return {
        "auc": float(roc_auc_score(flipped, scores)),
        "ap": float(average_precision_score(flipped, scores)),
        **found,
    }


def _training_losses(task, checkpoint: Path) -> np.ndarray:
    model = load_into(task.model(), checkpoint).eval()
    inputs, targets = task.train.tensors
    with torch.no_grad():
        return task.loss(model, (inputs, targets)).numpy()


def run_demo(
    output_dir: str | Path, *, seed: int = 0, progress: bool | None = None, echo: Callable[[str], None] = print
) -> dict:
    """Train, build, rank, query; print a summary and return the figures (also saved as results.json)."""
    started = time.perf_counter()
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    task_file = output_dir / "demo_task.py"
    task_file.write_text(_TASK_FILE.format(seed=seed))
    task_spec = f"{task_file}:task"
    task, noise = digits_with_info(flip_fraction=0.1, seed=seed)
    echo(f"digits: {len(task.train)} training images ({noise.n_flipped} labels flipped), {len(task.test)} test images")

    config = TrainConfig(epochs=30, lr=0.05, batch_size=64, n_checkpoints=4, seed=seed)
    show_training = sys.stderr.isatty() if progress is None else progress
    checkpoints = train(task, config, output_dir / "checkpoints", progress=show_training)
    echo(
        f"trained an MLP 64-32-10 for {config.epochs} epochs; checkpoints at epochs "
        f"{', '.join(str(c.epoch) for c in checkpoints)}"
    )

    store_path = output_dir / "digits.gradindex"
    build_started = time.perf_counter()
    store = build(
        task_spec,
        [f"{c.path}:{c.lr}" for c in checkpoints],
        store_path,
        proj_dim=1024,
        overwrite=True,
        progress=progress,
    )
    build_seconds = time.perf_counter() - build_started
    echo(f"built {store_path} ({store.n_samples} x {store.dim} {store.dtype}) in {build_seconds:.1f}s")

    ranking = self_influence(store)
    self_scores = np.empty(store.n_samples, dtype=np.float64)
    self_scores[ranking.column("row").to_numpy()] = ranking.column("score").to_numpy()
    flipped = noise.flipped_mask
    rng = np.random.default_rng(seed)
    results = {
        "self_influence": detection_metrics(self_scores, flipped),
        "training_loss": detection_metrics(_training_losses(task, checkpoints[-1].path), flipped),
        "random": detection_metrics(rng.random(store.n_samples), flipped),
    }
    echo("\nmislabeled detection (10% flipped labels; higher is better):")
    echo(f"  {'ranking':<16}{'AUC':>7}{'AP':>7}{'top 10%':>9}{'top 20%':>9}")
    for name, figures in results.items():
        echo(
            f"  {name:<16}{figures['auc']:>7.3f}{figures['ap']:>7.3f}"
            f"{figures['found_top10']:>9.1%}{figures['found_top20']:>9.1%}"
        )

    test_targets = task.test.tensors[1].numpy()
    train_labels = noise.noisy_labels
    query_samples = [0, 1, 2]
    proponents = query(store, split="test", samples=query_samples, k=3, progress=progress)
    opponents = query(store, split="test", samples=query_samples, k=3, opponents=True, progress=progress)
    echo("\ntop proponents (+) and opponents (-) of three test digits:")
    for query_id in query_samples:
        echo(f"  test #{query_id} (label {test_targets[query_id]}):")
        for sign, table in (("+", proponents), ("-", opponents)):
            picked = table.filter(np.asarray(table.column("query_id").to_numpy() == query_id))
            cells = [
                f"row {row} (label {train_labels[row]}{f', truly {noise.clean_labels[row]}' if flipped[row] else ''}) "
                f"{score:+.3g}"
                for row, score in zip(picked.column("row").to_pylist(), picked.column("score").to_pylist())
            ]
            echo(f"    {sign} " + "; ".join(cells))

    results["build_seconds"] = build_seconds
    results["total_seconds"] = time.perf_counter() - started
    results["store"] = str(store_path)
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    pq.write_table(ranking, output_dir / "self_influence.parquet")
    pq.write_table(proponents, output_dir / "proponents.parquet")
    echo(
        f"\nstore: {store_path}\nresults: {output_dir / 'results.json'}, {output_dir / 'self_influence.parquet'}, "
        f"{output_dir / 'proponents.parquet'}"
    )
    echo(f"next: gradindex query {store_path} --samples 0-4 -k 5   |   gradindex self-influence {store_path} --top 20")
    echo(f"done in {results['total_seconds']:.0f}s")
    return results
