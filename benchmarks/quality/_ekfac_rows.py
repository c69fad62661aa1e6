"""EK-FAC / K-FAC rows of the quality benchmark, with kronfluence's EK-FAC beside them on the same models and data.

    nice -n 10 python -m benchmarks.quality._ekfac_rows [--seeds 0,1,2] [--experiments lds,mislabel]

gradindex's rows (``EKFAC_CONFIGS``, registered into ``METHOD_CONFIGS`` so the full harness runs them too) are
``tracin`` stores built with ``precondition=ekfac|kfac`` on the ``kron`` projection with ``proj_dim`` = the
parameter count when it is at most 4,096 (every layer full rank: K-FAC / EK-FAC in the full parameter space, as
kronfluence computes it), else 4,096. Damping: the default, 0.1 x each layer block's mean eigenvalue.

kronfluence (``kronfluence.Analyzer``, CPU, float32 factors; its package version is recorded) runs on the same
trained checkpoint, training set and test points: EK-FAC factors fit on the whole training set, then pairwise scores
(LDS) and self-influence (mislabel detection). Rows: ``kronfluence-ekfac`` (its defaults: true Fisher with labels
sampled from the model, measurement = the loss, damping = its heuristic 0.1 x mean eigenvalue: the same damping rule
as gradindex's), ``kronfluence-ekfac-emp`` (the empirical Fisher, true labels: the curvature gradindex's rows use),
and ``kronfluence-ekfac-margin`` (measurement = −margin, as kronfluence's classification examples do).

Results: ``benchmarks/results/quality_ekfac.json`` and the ``ekfac`` section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from benchmarks.quality._methods import METHOD_CONFIGS, MethodConfig, NotRun

__all__ = ["EKFAC_CONFIGS", "PEERS", "main", "peer_records", "run"]

log = logging.getLogger("benchmarks.quality")

EKFAC_CONFIGS: dict[str, MethodConfig] = {
    "ekfac": MethodConfig(
        "tracin",
        "final",
        build={"precondition": "ekfac"},
        projection=("kron", None),
        note="tracin --precondition ekfac at the final checkpoint: EK-FAC of the projected gradients, query side",
    ),
    "kfac": MethodConfig(
        "tracin",
        "final",
        build={"precondition": "kfac"},
        projection=("kron", None),
        note="tracin --precondition kfac at the final checkpoint",
    ),
    "ekfac-cp": MethodConfig(
        "tracin",
        "trajectory",
        build={"precondition": "ekfac"},
        projection=("kron", None),
        note="tracin --precondition ekfac over the 4 SGD checkpoints, weight = lr (EK-FAC per checkpoint)",
    ),
    "ekfac-k1024": MethodConfig(
        "tracin",
        "final",
        build={"precondition": "ekfac"},
        projection=("kron", 1024),
        experiments=("lds", "mislabel"),
        note="tracin --precondition ekfac at the final checkpoint, kron projection to 1,024 (the default plan, pca "
        "sides)",
    ),
    "tracin-1-k1024": MethodConfig(
        "tracin",
        "final",
        projection=("kron", 1024),
        experiments=("lds", "mislabel"),
        note="TracIn at the final checkpoint, kron projection to 1,024 (the default plan)",
    ),
}
METHOD_CONFIGS.update(EKFAC_CONFIGS)

# kronfluence's configurations: (strategy, empirical Fisher, measurement)
PEERS: dict[str, tuple[str, bool, str]] = {
    "kronfluence-ekfac": ("ekfac", False, "loss"),
    "kronfluence-ekfac-emp": ("ekfac", True, "loss"),
    "kronfluence-ekfac-margin": ("ekfac", False, "margin"),
}
# what this module runs by default: the gradindex rows beside TracIn, then kronfluence's
COMPARED = ("tracin-1", "tracin-cp", "if-exact", "ekfac", "kfac", "ekfac-cp")
PLAN = {"lds": ["mnist-mlp"], "mislabel": ["digits-mlp-noisy", "mnist1d-mlp-noisy"]}


def _kronfluence_task(measurement: str):
    from kronfluence.task import Task

    class Classification(Task):
        """Cross-entropy classification as kronfluence's examples write it (sum over the batch)."""

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            inputs, labels = batch
            logits = model(inputs)
            if sample:  # the true Fisher: labels drawn from the model's own predictive distribution
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model) -> torch.Tensor:
            inputs, labels = batch
            logits = model(inputs)
            if measurement == "loss":
                return F.cross_entropy(logits, labels, reduction="sum")
            rows = torch.arange(len(labels))
            correct = logits[rows, labels]
            others = logits.clone()
            others[rows, labels] = -torch.inf
            return -(correct - others.logsumexp(dim=-1)).sum()

    return Classification()


def _analyzer(setting, name: str, workdir: Path):
    """A fitted kronfluence analyzer of the setting's final checkpoint (factors cached per configuration)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments

    from gradindex.checkpoints import load_into

    cache = setting.__dict__.setdefault("_kronfluence", {})
    if name in cache:
        return cache[name]
    strategy, empirical, measurement = PEERS[name]
    task = _kronfluence_task(measurement)
    model = load_into(setting.task.model(), setting.checkpoint_list("final")[0].rsplit(":", 1)[0]).eval()
    model = prepare_model(model, task)
    analyzer = Analyzer(
        analysis_name=f"{setting.name}-{setting.seed}-{name}",
        model=model,
        task=task,
        cpu=True,
        output_dir=str(workdir),
        disable_tqdm=True,
        disable_model_save=True,
    )
    train = TensorDataset(*setting.train_tensors)
    torch.manual_seed(setting.seed)  # the sampled labels of the true Fisher
    started = time.perf_counter()
    analyzer.fit_all_factors(
        factors_name="factors",
        dataset=train,
        per_device_batch_size=256,
        factor_args=FactorArguments(strategy=strategy, use_empirical_fisher=empirical),
        overwrite_output_dir=True,
    )
    cache[name] = (analyzer, train, time.perf_counter() - started)
    return cache[name]


def _score_args():
    from kronfluence.arguments import ScoreArguments

    return ScoreArguments(damping_factor=None)  # 0.1 x mean eigenvalue per module: gradindex's default rule


def kronfluence_scores(name: str, setting, tests: np.ndarray, workdir: Path) -> tuple[np.ndarray, dict]:
    """``[len(tests), n_train]`` kronfluence scores of every training sample for the test points, and timings."""
    analyzer, train, fit_seconds = _analyzer(setting, name, workdir)
    x_test, y_test = setting.test_tensors
    queries = TensorDataset(x_test[tests], y_test[tests])
    started = time.perf_counter()
    analyzer.compute_pairwise_scores(
        scores_name="pairwise",
        factors_name="factors",
        query_dataset=queries,
        train_dataset=train,
        per_device_query_batch_size=len(tests),
        per_device_train_batch_size=512,
        score_args=_score_args(),
        overwrite_output_dir=True,
    )
    scores = analyzer.load_pairwise_scores("pairwise")["all_modules"].double().numpy()
    return scores, {"build_s": round(fit_seconds, 2), "query_s": round(time.perf_counter() - started, 2)}


def kronfluence_self_scores(name: str, setting, workdir: Path) -> tuple[np.ndarray, dict]:
    """kronfluence's self-influence of every training sample, and timings."""
    analyzer, train, fit_seconds = _analyzer(setting, name, workdir)
    started = time.perf_counter()
    analyzer.compute_self_scores(
        scores_name="self",
        factors_name="factors",
        train_dataset=train,
        per_device_train_batch_size=512,
        score_args=_score_args(),
        overwrite_output_dir=True,
    )
    scores = analyzer.load_self_scores("self")["all_modules"].double().numpy()
    return scores, {"build_s": round(fit_seconds, 2), "query_s": round(time.perf_counter() - started, 2)}


def peer_records(setting, experiment: str, workdir: Path, peers: list[str] | None = None) -> list[dict]:
    """kronfluence's records for one setting and experiment, in the harness's record format."""
    from benchmarks.quality._experiments import _attempt, _detection, _lds_ground_truth, lds_metrics

    records: list[dict] = []
    try:
        import kronfluence
    except ImportError:
        kronfluence = None
    for name in list(PEERS) if peers is None else peers:
        base = {"experiment": experiment, "setting": setting.name, "seed": setting.seed, "method": name}

        def work(name=name):
            if kronfluence is None:
                raise NotRun("not run (kronfluence is not installed: pip install kronfluence)")
            peer = {"peer": f"kronfluence {kronfluence.__version__}"}
            if experiment == "lds":
                truth = _lds_ground_truth(setting)
                scores, timing = kronfluence_scores(name, setting, truth["tests"], workdir / "kronfluence")
                return {**lds_metrics(scores, truth), **timing, **peer}
            if experiment == "mislabel":
                scores, timing = kronfluence_self_scores(name, setting, workdir / "kronfluence")
                return {**_detection(scores, setting.noise.flipped_mask), **timing, **peer}
            raise NotRun(f"not run (not configured for {experiment})")

        if experiment == "mislabel":
            flipped = setting.noise.flipped_mask
            base.update(n_flipped=int(flipped.sum()), n_train=len(flipped), test_accuracy=setting.accuracy)
        _attempt(records, base, work)
    return records


def run(seeds: list[int], experiments: list[str], methods: list[str], peers: list[str], workdir: Path) -> dict:
    """The EK-FAC comparison: ``methods`` (gradindex configurations) and ``peers`` (kronfluence) on ``PLAN``."""
    from benchmarks._report import machine
    from benchmarks.quality._experiments import run_lds, run_mislabel
    from benchmarks.quality._methods import cleanup
    from benchmarks.quality._output import aggregate
    from benchmarks.quality._settings import make_setting

    started, records, timings = time.perf_counter(), [], {}
    for seed in seeds:
        for experiment in experiments:
            for name in PLAN[experiment]:
                tick = time.perf_counter()
                setting = make_setting(name, seed, workdir)
                log.info("seed %d: %s on %s", seed, experiment, name)
                runner = run_lds if experiment == "lds" else run_mislabel
                records += runner(setting, methods)
                records += peer_records(setting, experiment, setting.workdir, peers)
                cleanup(setting)
                timings[f"{experiment} {name} seed {seed}"] = round(time.perf_counter() - tick, 1)
    try:
        import kronfluence

        version = kronfluence.__version__
    except ImportError:
        version = None
    return {
        "benchmark": "quality-ekfac",
        "seeds": seeds,
        "experiments": experiments,
        "plan": {experiment: PLAN[experiment] for experiment in experiments},
        "method_configs": {
            name: {"method": c.method, "checkpoints": c.checkpoints, "build": c.build, "note": c.note}
            for name, c in METHOD_CONFIGS.items()
            if name in methods
        },
        "peers": {name: dict(zip(("strategy", "empirical_fisher", "measurement"), PEERS[name])) for name in peers},
        "kronfluence": version,
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "timings": timings,
        "summary": aggregate(records),
        "records": records,
    }


def _cell(values: list[float]) -> str:
    values = [value for value in values if value is not None and np.isfinite(value)]
    if not values:
        return "—"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def markdown(payload: dict, command: str) -> str:
    """The ``ekfac`` section of RESULTS.md."""
    records = payload["records"]
    lines = [
        "## EK-FAC / K-FAC preconditioning beside kronfluence (`python -m benchmarks.quality._ekfac_rows`)",
        "",
        f"seeds {', '.join(map(str, payload['seeds']))} (mean ± std over seeds), {payload['wall_seconds'] / 60:.1f} "
        f"min on {payload['machine'].get('cores', '?')} shared cores, kronfluence {payload['kronfluence']}. "
        f"Command: `{command}`.",
        "",
        "gradindex rows: `tracin --precondition ekfac|kfac` stores on the kron projection (proj_dim = the parameter "
        "count up to 4,096: the MLPs are factored exactly, the MNIST CNN (5,386) is projected to 4,096; `-k1024` rows: "
        "the default plan at proj_dim 1,024, pca sides), damping "
        "0.1 x each layer block's mean eigenvalue, Fisher = the empirical Fisher of the stored (true-label) "
        "gradients. kronfluence rows: the same checkpoint, data and test points; `kronfluence-ekfac` its defaults "
        "(true Fisher, sampled labels; measurement = loss), `-emp` the empirical Fisher, `-margin` measurement = "
        "−margin; damping its heuristic 0.1 x mean eigenvalue (`damping_factor=None`). Nothing was tuned on these "
        "test points. Mislabel detection runs on the two MLP settings only (the MNIST CNN's ~4,000-dim flat groups "
        "made its EK-FAC-CP builds take minutes each on the shared cores).",
        "",
    ]
    order = list(payload["method_configs"]) + list(payload["peers"]) + ["train-loss", "random"]
    for experiment, columns in (("lds", ("lds_margin", "lds_loss")), ("mislabel", ("auc", "ap", "found_top10"))):
        chosen = [record for record in records if record["experiment"] == experiment]
        if not chosen:
            continue
        lines += [
            "### "
            + (
                "Linear datamodeling score (α = 0.5, 100 subsets)"
                if experiment == "lds"
                else "Mislabeled detection (10% flipped, ranked by self-influence)"
            ),
            "",
            "| setting | method | seeds | " + " | ".join(columns) + " | build s | query s |",
            "|" + "---|" * (5 + len(columns)),
        ]
        for setting in dict.fromkeys(record["setting"] for record in chosen):
            for method in order:
                rows = [r for r in chosen if r["setting"] == setting and r["method"] == method]
                if not rows:
                    continue
                ok = [r for r in rows if r["status"] == "ok"]
                if not ok:
                    lines.append(f"| {setting} | {method} | 0 | {rows[0]['status']} |" + " |" * (len(columns) + 1))
                    continue
                cells = [_cell([r.get(column) for r in ok]) for column in columns]
                timing = [_cell([r.get(key) for r in ok]) for key in ("build_s", "query_s")]
                lines.append(f"| {setting} | {method} | {len(ok)} | " + " | ".join(cells + timing) + " |")
        lines.append("")
    lines += _paired(records)
    return "\n".join(lines).rstrip() + "\n"


def _paired(records: list[dict]) -> list[str]:
    """Per-seed differences of each gradindex EK-FAC row's LDS against kronfluence's EK-FAC on the same seed."""
    scores: dict[tuple[str, str], dict[int, float]] = {}
    for record in records:
        if record["experiment"] == "lds" and record["status"] == "ok":
            scores.setdefault((record["setting"], record["method"]), {})[record["seed"]] = record["lds_margin"]
    lines = []
    for (setting, method), found in scores.items():
        if "precondition" not in getattr(EKFAC_CONFIGS.get(method), "build", {}):
            continue
        for peer in ("kronfluence-ekfac", "kronfluence-ekfac-emp"):
            other = scores.get((setting, peer), {})
            seeds = sorted(set(found) & set(other))
            if seeds:
                differences = ", ".join(f"{found[seed] - other[seed]:+.3f}" for seed in seeds)
                lines.append(f"* {setting}: LDS of `{method}` − `{peer}`, seed by seed: {differences}")
    return (
        ["Paired by seed (same checkpoint, same test points, same retrained subsets):", "", *lines, ""] if lines else []
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality._ekfac_rows", description=__doc__)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--experiments", default="lds,mislabel")
    parser.add_argument("--methods", default=",".join(COMPARED))
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--output", help="JSON path (default benchmarks/results/quality_ekfac.json)")
    parser.add_argument("--no-markdown", action="store_true", help="do not update benchmarks/RESULTS.md")
    parser.add_argument(
        "--render", nargs=2, metavar=("JSON", "COMMAND"), help="run nothing: write the section from a saved payload"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from benchmarks._report import RESULTS_DIR, update_section

    if args.render:
        payload = json.loads(Path(args.render[0]).read_text())
        path = RESULTS_DIR / "quality_ekfac.json"
        path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        text = markdown(payload, args.render[1])
        update_section("ekfac", text)
        print(text + f"\nwrote {path}, benchmarks/RESULTS.md (section ekfac)")
        return 0
    split = lambda text: [part for part in text.split(",") if part]  # noqa: E731
    workdir = Path(tempfile.mkdtemp(prefix="gi-ekfac-"))
    try:
        payload = run(
            [int(seed) for seed in split(args.seeds)],
            split(args.experiments),
            split(args.methods),
            split(args.peers),
            workdir,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    path = Path(args.output) if args.output else RESULTS_DIR / "quality_ekfac.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    command = "nice -n 10 python -m benchmarks.quality._ekfac_rows " + " ".join(argv or sys.argv[1:])
    text = markdown(payload, command.strip())
    print(text + f"\nwrote {path}")
    if not args.no_markdown:
        update_section("ekfac", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
