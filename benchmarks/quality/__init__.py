"""Attribution quality: the field's own protocols on offline data, every gradindex method side by side.

    python -m benchmarks.quality                      # the full run (3 seeds; under 45 minutes on 2 cores)
    python -m benchmarks.quality --fast               # the CI subset (1 seed, small settings; a few minutes)
    python -m benchmarks.quality --experiments loo,mislabel --seeds 0,1 --methods tracin-cp,if-exact

1. leave-one-out fidelity (Koh & Liang 2017, Fig. 2): L2 logistic regression solved to a gradient norm
   below 1e-10; for 10 test points, retrain without each of the 40 most influential training points;
   Pearson / Spearman of the predicted against the actual change in test loss.
2. linear datamodeling score (Park et al. 2023; dattri's recipe): 100 random half-size subsets, a model
   retrained on each; Spearman of the summed scores against the retrained margin (and −loss), mean
   over 100 test points; logistic regression and an MLP.
3. mislabeled detection: 10% of training labels flipped; rank by self-influence; AUC, AP, fraction of
   flips in the top 10% / 20%, beside the training-loss and random rankings.
4. projection and retrieval fidelity: k ∈ {16, 128, 512, 2048}: Spearman of projected against exact
   scores, recall@10 of the projected top 10, and LDS / AUC as k moves.

Language-model tasks (LDS on a tiny GPT-2 fine-tune, mislabel detection on a tiny BERT, with Bergson and
kronfluence on the same models) are ``python -m benchmarks.quality._lm`` (its own JSON, plot and RESULTS.md
section). ``python -m benchmarks.quality --replace RERUN.json`` puts a rerun's records (e.g. some methods after a
library change) in place of the saved ones and redraws.

Methods are the rows of ``benchmarks.quality._methods.METHOD_CONFIGS``; those whose gradindex method is
missing are reported as not run. Results: ``benchmarks/results/quality.json``, the ``quality`` section
of ``benchmarks/RESULTS.md`` and ``benchmarks/results/quality_*.png``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["FAST", "FULL", "run"]

log = logging.getLogger("benchmarks.quality")

# experiment -> the settings it runs on
FULL = {
    "loo": ["breast-cancer-lr", "mnist-lr"],
    "lds": ["breast-cancer-lr", "mnist-lr", "mnist-mlp"],
    "mislabel": ["mnist-lr-noisy", "digits-mlp-noisy", "mnist1d-mlp-noisy", "mnist1d-cnn-noisy", "mnist-cnn-noisy"],
    "projection": ["digits-mlp-noisy", "mnist-mlp"],
}
FAST = {
    "loo": ["breast-cancer-lr"],
    "lds": ["breast-cancer-lr"],
    "mislabel": ["digits-mlp-noisy"],
    "projection": ["digits-mlp-noisy"],
}
FAST_DIMS = (16, 128, 512)
# the fast subset skips the configurations that need extra training runs (ensembles, independent models)
# and, on the network, the ones whose builds take minutes here
FAST_METHODS = {
    "loo": ["tracin-1", "tracin-cp", "if-exact", "if-cg", "if-lissa", "arnoldi", "trak"],
    "lds": ["tracin-1", "tracin-cp", "if-exact", "if-cg", "arnoldi", "trak"],
    "mislabel": ["tracin-1", "tracin-cp", "trak"],
    "projection": ["tracin-1"],
}
PROJECTION_METHODS = {"digits-mlp-noisy": ("tracin-1",), "mnist-mlp": ("tracin-1", "trak")}


def run(
    *,
    fast: bool = False,
    seeds: list[int] | None = None,
    experiments: list[str] | None = None,
    methods: list[str] | None = None,
    settings: list[str] | None = None,
    workdir: str | Path | None = None,
    on_records=None,
) -> dict:
    """Run the chosen experiments and return the JSON payload (records, aggregates, machine, timings)."""
    import gradindex
    from benchmarks._report import machine
    from benchmarks.quality._ekfac_rows import EKFAC_CONFIGS  # noqa: F401 (registers the EK-FAC rows)
    from benchmarks.quality._experiments import PROJECTION_DIMS, run_lds, run_loo, run_mislabel, run_projection
    from benchmarks.quality._methods import METHOD_CONFIGS, available, cleanup
    from benchmarks.quality._output import aggregate
    from benchmarks.quality._settings import make_setting

    plan = FAST if fast else FULL
    seeds = seeds if seeds is not None else ([0] if fast else [0, 1, 2])
    experiments = experiments or list(plan)
    unknown = [name for name in (methods or []) if name not in METHOD_CONFIGS]
    if unknown:
        raise ValueError(
            f"unknown method configuration(s) {', '.join(unknown)}; choose from {', '.join(METHOD_CONFIGS)}"
        )
    # the default projection, whatever it is now, and the dense JL projection every method supports
    kinds = tuple(dict.fromkeys([gradindex.BuildConfig().projection, "rademacher"]))
    dims = FAST_DIMS if fast else PROJECTION_DIMS
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="gi-quality-"))
    started = time.perf_counter()
    cpu_started = time.process_time()
    load_before = os.getloadavg()
    records: list[dict] = []
    timings: dict[str, float] = {}
    try:
        for seed in seeds:
            cache: dict[str, object] = {}

            def setting_for(name: str):
                if name not in cache:
                    tick = time.perf_counter()
                    cache[name] = make_setting(name, seed, root)
                    timings[f"train {name} seed {seed}"] = round(time.perf_counter() - tick, 1)
                return cache[name]

            for experiment in experiments:
                for name in plan[experiment]:
                    if settings is not None and name not in settings:
                        continue
                    tick = time.perf_counter()
                    setting = setting_for(name)
                    log.info("seed %d: %s on %s", seed, experiment, name)
                    chosen = FAST_METHODS[experiment] if fast and methods is None else methods
                    if experiment == "loo":
                        records += run_loo(setting, chosen)
                    elif experiment == "lds":
                        records += run_lds(setting, chosen)
                    elif experiment == "mislabel":
                        records += run_mislabel(setting, chosen)
                    elif experiment == "projection":
                        if "lds" in experiments and name in plan.get("lds", []):
                            pass  # ground truth already computed by the LDS experiment and cached on the setting
                        elif name == "mnist-mlp":
                            run_lds(setting, ["random"])  # just the retrained models, for LDS against k
                        records += run_projection(
                            setting,
                            kinds,
                            dims,
                            tuple(
                                m for m in PROJECTION_METHODS.get(name, ("tracin-1",)) if chosen is None or m in chosen
                            ),
                        )
                    timings[f"{experiment} {name} seed {seed}"] = round(time.perf_counter() - tick, 1)
                    if on_records is not None:  # partial results survive an interrupted run
                        on_records(records, timings)
            for setting in cache.values():
                cleanup(setting)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "benchmark": "quality",
        "mode": "fast" if fast else "full",
        "seeds": seeds,
        "experiments": experiments,
        "methods_available": list(available()),
        "method_configs": {
            name: {"method": c.method, "checkpoints": c.checkpoints, "build": c.build, "query": c.query, "note": c.note}
            for name, c in METHOD_CONFIGS.items()
            if (methods is None or name in methods) and (not fast or any(name in v for v in FAST_METHODS.values()))
        },
        "projection_kinds": list(kinds),
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "load_average": {"start": [round(x, 2) for x in load_before], "end": [round(x, 2) for x in os.getloadavg()]},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),  # all threads of this process
        "timings": timings,
        "summary": aggregate(records),
        "records": records,
    }
