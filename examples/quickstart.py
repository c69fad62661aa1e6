"""The Python API end to end on real data: train, build, rank, query, report, curate.

    python examples/quickstart.py [--workdir runs/quickstart] [--quick]

sklearn's digits with 10% of the training labels flipped (``gradindex.tasks.digits_with_info`` says
which), a small MLP trained with 4 checkpoints (2 with ``--quick``), a TracIn-CP store, then: how many
of the 10% highest self-influence samples are truly mislabeled, the proponents of one test digit, an
HTML report, and a kept/dropped table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import gradindex
from gradindex.tasks import digits_with_info
from gradindex.training import TrainConfig, train

TASK_FILE = "import gradindex.tasks\n\ndef task():\n    return gradindex.tasks.digits(flip_fraction=0.1, seed=0)\n"


def main(workdir: str | Path = "runs/quickstart", *, quick: bool = False, echo=print) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # a task file, so the store records how to rebuild the task (queries and reports need it)
    task_file = workdir / "task.py"
    task_file.write_text(TASK_FILE)
    task, noise = digits_with_info(flip_fraction=0.1, seed=0)

    config = TrainConfig(epochs=8 if quick else 30, lr=0.05, n_checkpoints=2 if quick else 4)
    checkpoints = train(task, config, workdir / "checkpoints")
    store = gradindex.build(
        f"{task_file}:task",
        [f"{c.path}:{c.lr}" for c in checkpoints],
        workdir / "digits.gradindex",
        proj_dim=256 if quick else 1024,
        overwrite=True,
    )

    ranking = gradindex.self_influence(store, top=len(noise.clean_labels) // 10)
    found = np.isin(ranking.column("row").to_numpy(), noise.flipped_rows).mean()
    echo(f"{found:.0%} of the top-10% self-influence samples are truly mislabeled (10% would be chance)")

    proponents = gradindex.query(store, split="test", samples=[0], k=3)
    echo("proponents of test digit 0:", proponents.select(["rank", "sample_id", "score"]).to_pylist())

    summary = gradindex.report(
        store, output=workdir / "report.html", queries=[0, 1], k=4, known_noisy=noise.flipped_rows
    )
    echo(f"report: {summary['output']} ({summary['pictures']} pictures)")

    keep = gradindex.curate(store, drop_top="10%")
    echo(f"curate: keep {sum(keep.column('keep').to_pylist())} of {keep.num_rows}")
    return {"found_top10": float(found), "report": summary, "kept": sum(keep.column("keep").to_pylist())}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/quickstart")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and a smaller projection (seconds)")
    args = parser.parse_args()
    main(args.workdir, quick=args.quick)
