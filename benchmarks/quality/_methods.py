"""The methods the harness compares: one row of ``METHOD_CONFIGS`` per configuration.

A configuration names a gradindex method, which checkpoints it is built from, its build options and
its query options. The harness runs every configuration whose method ``gradindex.methods.METHODS``
lists at run time and reports the others as "not run (method not available)". Hyperparameters are
fixed here, once, before any test point is seen: nothing is tuned on the evaluation.

Scores always come through the public API (``gradindex.build`` → ``gradindex.query`` with ``k`` = the
training-set size, ``gradindex.self_influence``), so asymmetric query transforms are exercised exactly
as a user gets them. Stores are float32 so the comparison is about the method, not float16 rounding.
"""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import gradindex
from gradindex.errors import GradIndexWarning

__all__ = ["BASELINES", "METHOD_CONFIGS", "MethodConfig", "NotRun", "available", "method_scores", "self_scores"]

# Damping "auto": 0 for the L2-regularised logistic regressions (the task's penalty is in the curvature,
# which is positive definite), 1e-3 for networks. Curvature: the Gauss-Newton matrix G (equal to the
# Hessian for logistic regression; positive semi-definite for networks, so CG and LiSSA are well posed).
DAMPING_NETWORKS = 1e-3
EXACT_MAX_PARAMS = 16_384  # below this many parameters stores hold exact gradients (projection "none")
# TRAK's Gram matrix lives in a k-dim space: projected above this many parameters, to dattri's MNIST proj_dim (512)
TRAK_PROJ_DIM = 512


# Self-influence with an iterative solver is one inverse-HVP per training sample. Measured here (2 shared cores,
# OMP_WAIT_POLICY=PASSIVE): the library's CG on the formed Gauss-Newton matrix (float32, 100 iterations) took
# 12-30 s for digits-MLP (1,347 samples x 2,410 parameters), ~2-4e-9 s per sample·parameter²: ~3 min per seed for
# MNIST-1D-CNN (4,000 x 3,274), ~7 min for MNIST-1D-MLP (4,000 x 5,110) and MNIST-CNN (4,000 x 5,386). LiSSA
# (depth 1000, batch 64) took 6.8 s per 256 samples on MNIST-LR, 10.8 s on digits-MLP and 26.6 s on MNIST-1D-MLP:
# 1-7 min per setting and seed, 15-20 min over the run, for a solver the exact and CG rows already cover there.
CG_SELF_RATE = 4e-9
CG_SELF_MAX_COST = 5e10
CG_SELF_COST = "CG self-influence measured ~2-4e-9 s x samples x parameters² (12-30 s on digits-MLP, 1,347 x 2,410)"
LISSA_SELF_COST = (
    "LiSSA self-influence (one depth-1000 recursion per sample) measured 6.8 s per 256 samples on MNIST-LR, "
    "10.8 s on digits-MLP, 26.6 s on MNIST-1D-MLP: 15-20 min over the run"
)


@dataclass(frozen=True)
class MethodConfig:
    """method: the gradindex method; checkpoints: which of a Setting's checkpoint lists it uses;
    build / query: method options at build and at query time; experiments: where it runs (None = all);
    max_params: skip larger models (cost), with the reason recorded."""

    method: str
    checkpoints: str = "final"
    build: dict = field(default_factory=dict)
    query: dict = field(default_factory=dict)
    experiments: tuple[str, ...] | None = None
    max_params: int | None = None
    max_cost: int | None = None  # parameters x training samples
    note: str = ""
    self_build: dict | None = None  # build options for self-influence (mislabel) when they differ from ``build``
    max_self_cost: float | None = None  # self-influence: skip above this many training samples x parameters²
    self_cost_note: str = ""  # the measured cost that sets max_self_cost, quoted when a setting is skipped
    projection: tuple[str, int | None] | None = None  # its own (kind, proj_dim); None: the parameters, at most 4096
    layers: tuple[str, ...] | None = None  # parameter / module globs to index (None: every parameter)
    normalize: bool = False  # unit-normalise each checkpoint's block (cosine scores; TrackStar's unit normalisation)


METHOD_CONFIGS: dict[str, MethodConfig] = {
    "tracin-1": MethodConfig("tracin", "final", note="TracIn at the final checkpoint alone (grad-dot)"),
    "tracin-cp": MethodConfig("tracin", "trajectory", note="TracIn-CP over 4 SGD checkpoints, weight = lr"),
    "tracin-ge": MethodConfig("tracin", "ensemble", note="TracIn over 5 geometric-ensemble members, weight 1/M"),
    "gex": MethodConfig("gex", "gex", build={"tau": 0.05}, note="GEX over 5 geometric-ensemble members"),
    "if-exact": MethodConfig(
        "if",
        "final",
        build={"solver": "exact", "damping": "auto", "hessian": "ggn"},
        query={"solver": "exact"},
        max_params=6000,
        note="influence function, explicit (G + λI)⁻¹ (G from per-sample output Jacobians, "
        "one Cholesky factor shared by build and queries)",
    ),
    # CG and LiSSA are query-time solvers for LOO / LDS: the store is built with a one-step LiSSA (its stored
    # self-influence is not used there) and every query solves with the configuration's own solver. For mislabel
    # detection the store is built with the solver itself: one solve per training sample.
    "if-cg": MethodConfig(
        "if",
        "final",
        build={"solver": "lissa", "lissa_depth": 1, "damping": "auto", "hessian": "ggn"},
        query={"solver": "cg"},
        self_build={"solver": "cg", "damping": "auto", "hessian": "ggn"},
        max_self_cost=CG_SELF_MAX_COST,
        self_cost_note=CG_SELF_COST,
        note="influence function, conjugate gradients (100 iterations at most, tol 1e-6; the library multiplies by "
        "the formed Gauss-Newton matrix when right-hand sides x iterations exceed the parameters)",
    ),
    "if-lissa": MethodConfig(
        "if",
        "final",
        build={"solver": "lissa", "lissa_depth": 1, "damping": "auto", "hessian": "ggn"},
        query={"solver": "lissa", "lissa_depth": 1000},
        self_build={"solver": "lissa", "damping": "auto", "hessian": "ggn"},
        max_self_cost=0,
        self_cost_note=LISSA_SELF_COST,
        note="influence function, LiSSA (depth 1000, batch 64)",
    ),
    "arnoldi": MethodConfig(
        "arnoldi",
        "final",
        build={"rank": 20, "hessian": "ggn"},
        max_cost=30_000_000,
        note="Arnoldi, top-20 eigenpairs of G (the default rank)",
    ),
    "trak": MethodConfig("trak", "final", note="TRAK at the final checkpoint (TRAK-1)"),
    "trak-5": MethodConfig(
        "trak", "independent:5", experiments=("lds",), note="TRAK over 5 independently trained models"
    ),
    "trak-10": MethodConfig(
        "trak", "independent", experiments=("lds",), note="TRAK over 10 independently trained models (TRAK-10)"
    ),
    "trak-10-half": MethodConfig(
        "trak",
        "independent-half",
        experiments=("lds",),
        note="TRAK over 10 models each trained on a random half of the training set (dattri's TRAK-10 models)",
    ),
}

BASELINES = {
    "train-loss": "the training loss of each sample at the final checkpoint (mislabel detection only)",
    "random": "uniform random scores",
}


class NotRun(Exception):
    """A configuration that cannot run here; its message says why."""


def available() -> tuple[str, ...]:
    import gradindex.methods

    return tuple(gradindex.methods.METHODS)


def check_runnable(
    name: str, config: MethodConfig, setting, experiment: str, projection: tuple[str, int] | None = None
) -> None:
    if config.method not in available():
        raise NotRun("not run (method not available)")
    if config.experiments is not None and experiment not in config.experiments:
        raise NotRun(f"not run (not configured for {experiment})")
    if config.max_params is not None and setting.n_params > config.max_params:
        raise NotRun(f"not run (CPU budget: {setting.n_params} parameters > {config.max_params} for this solver)")
    n_train = len(setting.task.train)
    if (
        experiment == "mislabel"
        and config.max_self_cost is not None
        and n_train * setting.n_params**2 > config.max_self_cost
    ):
        estimate = CG_SELF_RATE * n_train * setting.n_params**2
        raise NotRun(
            f"skipped: CPU budget, {n_train:,} samples x {setting.n_params:,} parameters"
            + (
                f" (≈ {estimate / 60:.0f} min per seed); "
                if config.method == "if" and "cg" in str(config.self_build)
                else "; "
            )
            + config.self_cost_note
        )
    if config.max_cost is not None and setting.n_params * n_train > config.max_cost:
        raise NotRun(f"not run (CPU budget: {setting.n_params} parameters x {n_train} samples > {config.max_cost:.0e})")
    if projection is not None and projection[0] == "kron" and config.method in ("if", "trak"):
        raise NotRun(f"not run (--method {config.method} does not accept the kron projection)")
    if setting.logreg is not None and config.checkpoints.startswith("independent"):
        raise NotRun("not run (logistic regression has one optimum; independent runs coincide)")


def _projection(config: MethodConfig, setting, projection: tuple[str, int] | None) -> dict:
    if projection is not None:
        kind, dim = projection
        return {"projection": kind, "proj_dim": dim}
    if config.projection is not None:
        kind, dim = config.projection
        return {"projection": kind, "proj_dim": dim or min(setting.n_params, 4096)}
    if config.method == "trak" and setting.n_params > TRAK_PROJ_DIM:
        return {"projection": "rademacher", "proj_dim": TRAK_PROJ_DIM}
    if setting.n_params <= EXACT_MAX_PARAMS:
        return {"projection": "none", "proj_dim": setting.n_params}
    return {"projection": "rademacher", "proj_dim": 4096}


def build_store(
    name: str, config: MethodConfig, setting, projection: tuple[str, int] | None = None, for_self: bool = False
) -> tuple[Any, float]:
    """Build (or reuse) the store of one configuration on one setting: ``(store, build seconds)``; ``for_self``:
    the store whose build computes the self-influence (``config.self_build`` when it has one)."""
    options = _projection(config, setting, projection)
    for_self = for_self and config.self_build is not None
    tag = f"{name}-{options['projection']}{options['proj_dim']}" + ("-self" if for_self else "")
    path = setting.workdir / "stores" / f"{tag}.gradindex"
    cache = setting.__dict__.setdefault("_stores", {})
    if tag in cache:
        return cache[tag]
    checkpoints = setting.checkpoint_list(config.checkpoints)
    method_options = dict(config.self_build if for_self else config.build)
    if method_options.get("damping") == "auto":
        method_options["damping"] = 0.0 if setting.logreg is not None else DAMPING_NETWORKS
    started = time.perf_counter()
    with warnings.catch_warnings():
        if config.self_build is not None and not for_self:  # a one-step LiSSA whose self-influence is not used
            warnings.simplefilter("ignore", GradIndexWarning)
        store = gradindex.build(
            setting.task,
            checkpoints,
            path,
            method=config.method,
            dtype="float32",
            overwrite=True,
            progress=False,
            device="cpu",
            method_options=method_options,
            layers=list(config.layers) if config.layers else None,
            normalize=config.normalize,
            **options,
        )
    cache[tag] = (store, time.perf_counter() - started)
    return cache[tag]


def method_scores(
    name: str, config: MethodConfig, setting, samples: np.ndarray, projection: tuple[str, int] | None = None
) -> tuple[np.ndarray, dict]:
    """``[len(samples), n_train]`` scores of every training sample for the given test samples, and timings."""
    store, build_seconds = build_store(name, config, setting, projection)
    n_train = len(setting.task.train)
    started = time.perf_counter()
    table = gradindex.query(
        store,
        setting.task,
        split="test",
        samples=[int(s) for s in samples],
        k=n_train,
        device="cpu",
        progress=False,
        method_options=dict(config.query) or None,
    )
    scores = np.full((len(samples), n_train), np.nan)
    scores[table.column("query").to_numpy(), table.column("row").to_numpy()] = table.column("score").to_numpy()
    if np.isnan(scores).any():
        raise RuntimeError(f"{name}: the query returned {int(np.isnan(scores).sum())} missing scores")
    return scores, {"build_s": round(build_seconds, 2), "query_s": round(time.perf_counter() - started, 2)}


def self_scores(
    name: str, config: MethodConfig, setting, projection: tuple[str, int] | None = None
) -> tuple[np.ndarray, dict]:
    """Self-influence of every training sample (store row order) as the store reports it, and timings."""
    store, build_seconds = build_store(name, config, setting, projection, for_self=True)
    started = time.perf_counter()
    table = gradindex.self_influence(store)
    scores = np.full(len(setting.task.train), np.nan)
    scores[table.column("row").to_numpy()] = table.column("score").to_numpy()
    return scores, {"build_s": round(build_seconds, 2), "query_s": round(time.perf_counter() - started, 2)}


def training_losses(setting) -> np.ndarray:
    from gradindex.checkpoints import load_into

    model = load_into(setting.task.model(), setting.checkpoint_list("final")[0].rsplit(":", 1)[0]).eval()
    with torch.no_grad():
        return setting.task.loss(model, setting.task.train.tensors).double().numpy()


def cleanup(setting) -> None:
    setting.__dict__.pop("_stores", None)
    shutil.rmtree(setting.workdir / "stores", ignore_errors=True)
