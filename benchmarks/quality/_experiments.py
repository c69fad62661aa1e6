"""The four protocols: leave-one-out, linear datamodeling score, mislabeled detection, projection fidelity.

Each ``run_*`` takes one Setting (one data set, model and seed) and returns flat records
``{experiment, setting, seed, method, status, ...metrics}``; ``status`` is ``ok`` or the reason a
configuration did not run. Ground truth (retrained models) is computed once per Setting and shared by
every method.
"""

from __future__ import annotations

import logging
import time
import traceback
import warnings

import numpy as np
from scipy.stats import pearsonr, spearmanr

from benchmarks.quality._methods import (
    METHOD_CONFIGS,
    MethodConfig,
    NotRun,
    check_runnable,
    method_scores,
    self_scores,
    training_losses,
)
from benchmarks.quality._retrain import evaluate_many, train_many
from gradindex.apps.demo import detection_metrics
from gradindex.errors import GradIndexWarning

__all__ = [
    "LDS_SUBSETS",
    "LDS_TESTS",
    "LOO_TESTS",
    "LOO_TOP",
    "PROJECTION_DIMS",
    "run_lds",
    "run_loo",
    "run_mislabel",
    "run_projection",
]

log = logging.getLogger("benchmarks.quality")

LOO_TESTS = 10  # test points
LOO_TOP = 40  # most influential training points removed for each
LDS_SUBSETS = 100  # random training subsets
LDS_ALPHA = 0.5  # subset fraction
LDS_TESTS = 100  # test points the score is averaged over
PROJECTION_DIMS = (16, 128, 512, 2048)
DETECTION_GRID = np.linspace(0.0, 1.0, 51)


def _attempt(records: list, base: dict, work) -> None:
    """Run one configuration; a configuration that cannot run or fails becomes a record saying so."""
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GradIndexWarning)
            metrics = work()
        notes = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, GradIndexWarning)))
        if notes:  # e.g. LiSSA did not converge: the number stands, with the library's warning beside it
            metrics = {**metrics, "warnings": notes}
    except NotRun as reason:
        records.append({**base, "status": str(reason)})
        return
    except Exception as error:  # a failing method must not hide the others' numbers
        log.warning("%s failed: %s", base, error)
        records.append(
            {
                **base,
                "status": f"failed: {type(error).__name__}: {str(error)[:300]}",
                "traceback": traceback.format_exc()[-2000:],
            }
        )
        return
    records.append({**base, "status": "ok", **metrics, "seconds": round(time.perf_counter() - started, 2)})


def _configs(methods: list[str] | None) -> dict[str, MethodConfig]:
    return {name: config for name, config in METHOD_CONFIGS.items() if methods is None or name in methods}


def _correlations(predicted: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    if np.std(predicted) == 0 or np.std(actual) == 0:
        return float("nan"), float("nan")
    return float(pearsonr(predicted, actual)[0]), float(spearmanr(predicted, actual)[0])


# ---- 1. leave-one-out --------------------------------------------------------------------------------


def _loo_ground_truth(setting) -> dict:
    """Retrain without each of the LOO_TOP most influential points (by the harness's own float64 exact
    influence, the same points for every method) of LOO_TESTS random test points."""
    if "loo" in setting.__dict__.get("_truth", {}):
        return setting._truth["loo"]
    logreg = setting.logreg
    rng = np.random.default_rng([setting.seed, 1])
    x_test, y_test = (t.numpy() for t in setting.test_tensors)
    tests = np.sort(rng.choice(len(y_test), size=LOO_TESTS, replace=False))
    reference = logreg.exact_influence(x_test[tests], y_test[tests])  # [q, n]
    top = np.argsort(-np.abs(reference), axis=1, kind="stable")[:, :LOO_TOP]
    removed = np.unique(top)
    weights = np.ones((len(removed), logreg.n))
    weights[np.arange(len(removed)), removed] = 0.0
    started = time.perf_counter()
    theta = logreg.fit(weights)
    _, base_loss = logreg.outputs(logreg.theta_star[None], x_test[tests], y_test[tests])
    _, loo_loss = logreg.outputs(theta, x_test[tests], y_test[tests])  # [removed, q]
    actual = np.full((LOO_TESTS, logreg.n), np.nan)
    actual[:, removed] = (loo_loss - base_loss).T
    truth = {
        "tests": tests,
        "top": top,
        "actual": actual,
        "reference": reference,
        "n_retrained": len(removed),
        "retrain_s": round(time.perf_counter() - started, 1),
        "max_grad_norm": logreg.max_grad_norm,
    }
    setting.__dict__.setdefault("_truth", {})["loo"] = truth
    return truth


def _loo_metrics(scores: np.ndarray, truth: dict) -> dict:
    pearsons, spearmans, predicted_all, actual_all = [], [], [], []
    for q in range(len(truth["tests"])):
        rows = truth["top"][q]
        predicted, actual = scores[q, rows], truth["actual"][q, rows]
        p, s = _correlations(predicted, actual)
        pearsons.append(p)
        spearmans.append(s)
        predicted_all.append(predicted / (np.abs(predicted).max() or 1.0))
        actual_all.append(actual / (np.abs(actual).max() or 1.0))
    pooled_p, pooled_s = _correlations(np.concatenate(predicted_all), np.concatenate(actual_all))
    return {
        "pearson": float(np.nanmean(pearsons)),
        "spearman": float(np.nanmean(spearmans)),
        "pooled_pearson": pooled_p,
        "pooled_spearman": pooled_s,
    }


def run_loo(setting, methods: list[str] | None = None) -> list[dict]:
    truth = _loo_ground_truth(setting)
    base = {"experiment": "loo", "setting": setting.name, "seed": setting.seed}
    records: list[dict] = []
    extra = {
        "n_retrained": truth["n_retrained"],
        "retrain_s": truth["retrain_s"],
        "max_grad_norm": truth["max_grad_norm"],
    }
    _attempt(
        records,
        {**base, "method": "reference (harness exact IF, float64)"},
        lambda: {**_loo_metrics(truth["reference"], truth), **extra},
    )
    for name, config in _configs(methods).items():

        def work(name=name, config=config):
            check_runnable(name, config, setting, "loo")
            scores, timing = method_scores(name, config, setting, truth["tests"])
            return {**_loo_metrics(scores, truth), **timing}

        _attempt(records, {**base, "method": name}, work)
    rng = np.random.default_rng([setting.seed, 2])
    _attempt(
        records, {**base, "method": "random"}, lambda: _loo_metrics(rng.standard_normal(truth["actual"].shape), truth)
    )
    return records


# ---- 2. linear datamodeling score ------------------------------------------------------------------


def _lds_ground_truth(setting) -> dict:
    """LDS_SUBSETS random subsets of size LDS_ALPHA·n, a model retrained on each (LR: exact optimum;
    networks: the original recipe from a fresh initialisation), evaluated on LDS_TESTS test points."""
    if "lds" in setting.__dict__.get("_truth", {}):
        return setting._truth["lds"]
    rng = np.random.default_rng([setting.seed, 3])
    x_train, y_train = setting.train_tensors
    x_test, y_test = setting.test_tensors
    n = len(y_train)
    size = int(round(LDS_ALPHA * n))
    subsets = np.stack([np.sort(rng.choice(n, size=size, replace=False)) for _ in range(LDS_SUBSETS)])
    masks = np.zeros((LDS_SUBSETS, n))
    masks[np.arange(LDS_SUBSETS)[:, None], subsets] = 1.0
    tests = np.sort(rng.choice(len(y_test), size=min(LDS_TESTS, len(y_test)), replace=False))
    started = time.perf_counter()
    if setting.logreg is not None:
        theta = setting.logreg.fit(masks, tol=1e-8)
        margin, loss = setting.logreg.outputs(theta, x_test[tests].numpy(), y_test[tests].numpy())
    else:
        config = setting.train_config
        chunks = train_many(
            setting.make_model,
            x_train,
            y_train,
            subsets,
            seeds=rng.integers(0, 2**31, LDS_SUBSETS),
            epochs=config.epochs,
            lr=config.lr,
            batch_size=config.batch_size,
            momentum=config.momentum,
        )
        margin, loss = evaluate_many(chunks, x_test[tests], y_test[tests])
    truth = {
        "tests": tests,
        "masks": masks,
        "margin": margin,
        "loss": loss,
        "retrain_s": round(time.perf_counter() - started, 1),
        "retrained_accuracy": float((margin > 0).mean()),
    }
    setting.__dict__.setdefault("_truth", {})["lds"] = truth
    return truth


def lds_metrics(scores: np.ndarray, truth: dict) -> dict:
    """Spearman, over subsets, of the summed scores against the retrained margin and −loss; mean over test points."""
    summed = scores @ truth["masks"].T  # [q, subsets]
    by_margin, by_loss = [], []
    for q in range(len(summed)):
        if np.std(summed[q]) == 0:
            by_margin.append(np.nan)
            by_loss.append(np.nan)
            continue
        by_margin.append(spearmanr(summed[q], truth["margin"][:, q])[0])
        by_loss.append(spearmanr(summed[q], -truth["loss"][:, q])[0])
    return {"lds_margin": float(np.nanmean(by_margin)), "lds_loss": float(np.nanmean(by_loss))}


def run_lds(setting, methods: list[str] | None = None) -> list[dict]:
    truth = _lds_ground_truth(setting)
    base = {"experiment": "lds", "setting": setting.name, "seed": setting.seed}
    extra = {"retrain_s": truth["retrain_s"], "retrained_accuracy": truth["retrained_accuracy"]}
    records: list[dict] = []
    for name, config in _configs(methods).items():

        def work(name=name, config=config):
            check_runnable(name, config, setting, "lds")
            scores, timing = method_scores(name, config, setting, truth["tests"])
            return {**lds_metrics(scores, truth), **timing, **extra}

        _attempt(records, {**base, "method": name}, work)
    rng = np.random.default_rng([setting.seed, 4])
    _attempt(
        records,
        {**base, "method": "random"},
        lambda: lds_metrics(rng.standard_normal((len(truth["tests"]), truth["masks"].shape[1])), truth),
    )
    return records


# ---- 3. mislabeled detection -------------------------------------------------------------------------


def detection_curve(scores: np.ndarray, flipped: np.ndarray) -> list[float]:
    """Fraction of flipped labels found when inspecting each fraction of DETECTION_GRID, highest scores first."""
    order = np.argsort(-scores, kind="stable")
    found = np.concatenate([[0], np.cumsum(flipped[order])]) / max(1, flipped.sum())
    return [float(found[int(round(f * len(scores)))]) for f in DETECTION_GRID]


def _detection(scores: np.ndarray, flipped: np.ndarray) -> dict:
    if not np.isfinite(scores).all():
        raise RuntimeError(f"{int((~np.isfinite(scores)).sum())} self-influence scores are not finite")
    return {**detection_metrics(scores, flipped), "curve": detection_curve(scores, flipped)}


def run_mislabel(setting, methods: list[str] | None = None) -> list[dict]:
    flipped = setting.noise.flipped_mask
    base = {
        "experiment": "mislabel",
        "setting": setting.name,
        "seed": setting.seed,
        "n_flipped": int(flipped.sum()),
        "n_train": len(flipped),
        "test_accuracy": setting.accuracy,
    }
    records: list[dict] = []
    for name, config in _configs(methods).items():

        def work(name=name, config=config):
            check_runnable(name, config, setting, "mislabel")
            scores, timing = self_scores(name, config, setting)
            return {**_detection(scores, flipped), **timing}

        _attempt(records, {**base, "method": name}, work)
    _attempt(records, {**base, "method": "train-loss"}, lambda: _detection(training_losses(setting), flipped))
    rng = np.random.default_rng([setting.seed, 5])
    _attempt(records, {**base, "method": "random"}, lambda: _detection(rng.random(len(flipped)), flipped))
    return records


# ---- 4. projection and retrieval fidelity --------------------------------------------------------------


def run_projection(
    setting,
    kinds: tuple[str, ...],
    dims: tuple[int, ...] = PROJECTION_DIMS,
    methods: tuple[str, ...] = ("tracin-1", "trak"),
) -> list[dict]:
    """For each projection kind and k: Spearman of projected vs exact scores and recall@10 of the projected
    index's top 10 against the exact top 10 (TracIn, whose exact scores are cheap), mislabel AUC when
    the setting has flipped labels, and LDS when the setting has LDS ground truth."""
    records: list[dict] = []
    base = {"experiment": "projection", "setting": setting.name, "seed": setting.seed, "n_params": setting.n_params}
    truth = setting.__dict__.get("_truth", {}).get("lds")
    rng = np.random.default_rng([setting.seed, 6])
    tests = (
        truth["tests"]
        if truth is not None
        else np.sort(rng.choice(len(setting.task.test), size=min(100, len(setting.task.test)), replace=False))
    )
    exact: dict[str, np.ndarray] = {}
    for name in methods:
        config = METHOD_CONFIGS[name]
        if config.method == "tracin":
            try:
                exact[name], _ = method_scores(name, config, setting, tests, projection=("none", setting.n_params))
            except Exception as error:  # recorded below through the per-k attempts
                log.warning("exact scores for %s failed: %s", name, error)
    for name in methods:
        config = METHOD_CONFIGS[name]
        for kind in kinds:
            for dim in [*list(dims), "exact"]:
                if dim == "exact" and config.method != "tracin":
                    continue
                projection = ("none", setting.n_params) if dim == "exact" else (kind, int(dim))
                if dim == "exact" and kind != kinds[0]:
                    continue

                def work(name=name, config=config, projection=projection):
                    check_runnable(name, config, setting, "projection", projection)
                    out: dict = {}
                    scores, timing = method_scores(name, config, setting, tests, projection=projection)
                    out.update(timing)
                    if name in exact:
                        rho = [spearmanr(scores[q], exact[name][q])[0] for q in range(len(tests))]
                        out["spearman_vs_exact"] = float(np.mean(rho))
                        top_exact = np.argsort(-exact[name], axis=1, kind="stable")[:, :10]
                        top_projected = np.argsort(-scores, axis=1, kind="stable")[:, :10]
                        out["recall_at_10"] = float(
                            np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_exact, top_projected)])
                        )
                    if truth is not None:
                        out.update(lds_metrics(scores, truth))
                    if setting.noise is not None and setting.noise.n_flipped:
                        self_, _ = self_scores(name, config, setting, projection=projection)
                        out["auc"] = detection_metrics(self_, setting.noise.flipped_mask)["auc"]
                    return out

                label = "exact" if dim == "exact" else kind
                _attempt(
                    records,
                    {**base, "method": name, "kind": label, "k": setting.n_params if dim == "exact" else int(dim)},
                    work,
                )
    return records
