"""The attribution methods, one module each: what φ is, and for asymmetric ones the query-side transform.

Every method is a featurizer (``φ`` per sample) plus, for asymmetric ones, a query-side transform; all of them
share the one store format and the one inner-product index. ``tracin`` with ``precondition=kfac|ekfac`` (row
``tracin+pc``, ``_ekfac``) keeps TracIn's rows and applies each checkpoint's K-FAC / EK-FAC curvature H_c of the
projected gradients on the query side. ``make_featurizer`` builds one by name (the
registry the pipeline calls); ``METHOD_OPTIONS`` says what options each takes.

=========  ==============================================  ====================================  =========
method     stored row φ(z)                                 query vector                          symmetric
=========  ==============================================  ====================================  =========
tracin     [√η_c P_c∇ℓ(z; θ_c)]_c                          φ(q)                                  yes
tracin+pc  [√η_c P_c∇ℓ(z; θ_c)]_c                          [η_c(H_c + λ)^{-1}√η_c P_c∇ℓ(q)]_c    no
gex        (1/√M)[ℓ(z; θ_m) − max(ℓ(z; θ*), τ)]_m          φ(q)                                  yes
if         P∇ℓ(z; θ*)                                      P(H + λI)^{-1}∇ℓ(q; θ*)               no
arnoldi    (Λ + λ)^{-1/2}Uᵀ∇ℓ(z; θ*)                       φ(q)                                  yes
trak       Q(z)[P_c∇f(z; θ_c)]_c                           (1/C)[(Φ_cᵀΦ_c + λI)^{-1}P_c∇f(q)]_c  no
=========  ==============================================  ====================================  =========
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gradindex.errors import ArgumentError
from gradindex.methods._options import (
    CURVATURES,
    METHOD_OPTIONS,
    PRECONDITIONERS,
    QUERY_TIME_OPTIONS,
    SOLVERS,
    OptionSpec,
    resolve_options,
)
from gradindex.methods._self_influence import finish_store, recompute_self_influence, stored_self_influence
from gradindex.utils import lazy_exports

if TYPE_CHECKING:
    import torch

    from gradindex.featurize import Featurizer, LoadedCheckpoint
    from gradindex.projection import ProjectionSpec
    from gradindex.task import Task

__all__ = [
    "CALIBRATION_SAMPLES",
    "CURVATURES",
    "DENSE_MAX",
    "EIGENBASIS",
    "KRON_SIDES_TRANSFORM",
    "METHODS",
    "METHOD_OPTIONS",
    "PRECONDITIONERS",
    "PRECONDITION_TRANSFORM",
    "QUERY_TIME_OPTIONS",
    "SOLVERS",
    "ArnoldiFeaturizer",
    "CGSolver",
    "Curvature",
    "ExactSolver",
    "GexFeaturizer",
    "GramInverse",
    "InfluenceFeaturizer",
    "LissaSolver",
    "MethodFeaturizer",
    "OptionSpec",
    "PreconditionGroup",
    "Preconditioned",
    "Preconditioner",
    "TracInFeaturizer",
    "TrakFeaturizer",
    "arnoldi",
    "as_method_featurizer",
    "finish_precondition",
    "finish_store",
    "make_featurizer",
    "precondition_groups",
    "precondition_self_influence",
    "recompute_self_influence",
    "resolve_options",
    "row_dots",
    "stored_self_influence",
    "trak_self_influence",
]

# the featurizers, solvers and curvature need torch: they load with their first use, so that METHODS and
# METHOD_OPTIONS (the command line's choices) stay light
if TYPE_CHECKING:  # loaded on first use (lazy_exports)
    from gradindex.methods._arnoldi import EIGENBASIS, ArnoldiFeaturizer
    from gradindex.methods._base import MethodFeaturizer, as_method_featurizer, row_dots
    from gradindex.methods._curvature import Curvature
    from gradindex.methods._ekfac import (
        DENSE_MAX,
        PRECONDITION_TRANSFORM,
        Preconditioned,
        Preconditioner,
        PreconditionGroup,
        finish_precondition,
        precondition_groups,
        precondition_self_influence,
    )
    from gradindex.methods._gex import GexFeaturizer
    from gradindex.methods._influence import InfluenceFeaturizer
    from gradindex.methods._solvers import CGSolver, ExactSolver, LissaSolver, arnoldi
    from gradindex.methods._tracin import CALIBRATION_SAMPLES, KRON_SIDES_TRANSFORM, TracInFeaturizer
    from gradindex.methods._trak import GramInverse, TrakFeaturizer, trak_self_influence

__getattr__, __dir__ = lazy_exports(__name__)

# every method by name, with what its vectors are (the command line's choices and help come from here)
METHODS: dict[str, str] = {
    "tracin": "TracIn-CP: learning-rate weighted gradient dot products summed over checkpoints",
    "gex": "GEX: loss deviations of a geometric ensemble's members from the trained model",
    "if": "influence functions: (H + λI)^-1 on the query side (exact, CG or LiSSA)",
    "arnoldi": "Arnoldi influence: gradients in the top-r eigenbasis of the Hessian",
    "trak": "TRAK: projected output gradients, (ΦᵀΦ + λI)^-1 on the query side",
}

# the featurizer class of each method besides tracin, by name (loaded with its first use)
_FEATURIZERS = {
    "gex": "GexFeaturizer",
    "if": "InfluenceFeaturizer",
    "arnoldi": "ArnoldiFeaturizer",
    "trak": "TrakFeaturizer",
}


def make_featurizer(
    method: str,
    task: Task,
    checkpoints: Sequence[LoadedCheckpoint],
    *,
    projection: ProjectionSpec,
    layers: Sequence[str] | None,
    normalize: bool,
    device: torch.device,
    options: Mapping[str, Any] | None = None,
    runtime: Mapping[str, Any] | None = None,
) -> Featurizer:
    """The featurizer for ``method``; the same call at build and at query time gives the same vectors.

    Args:
        method: one of ``METHODS``.
        task: the task whose model and loss are featurized.
        checkpoints: the loaded checkpoints (``gradindex.featurize.load_checkpoints``), in order.
        projection: the projection of each checkpoint's gradient.
        layers: parameter-name globs to featurize (None: every trainable parameter).
        normalize: unit-normalise each checkpoint's block (cosine scores).
        device: where featurization runs.
        options: the method's options (``METHOD_OPTIONS[method]``); recorded in the fingerprint.
        runtime: how, not what (not fingerprinted): ``chunk_bytes``, ``compile``, ``autocast`` and ``nonfinite`` for
            tracin.
    """
    if method == "tracin":
        from gradindex.methods._tracin import TracInFeaturizer

        resolved = resolve_options("tracin", options)  # says which method the options belong to
        given = [
            name
            for name in ("damping", "precondition_side", "factor_samples", "precondition_mix")
            if (options or {}).get(name) is not None
        ]
        if resolved["precondition"] == "none" and given:
            raise ArgumentError(
                given[0],
                f"{given[0]} applies to method=tracin only with precondition=kfac or ekfac; add precondition=ekfac or "
                f"leave {given[0]} out",
                also=["precondition"],
            )
        featurizer = TracInFeaturizer(
            task,
            checkpoints,
            projection=projection,
            layers=layers,
            normalize=normalize,
            device=device,
            adam_normalize=resolved["adam_normalize"],
            **(runtime or {}),
        )
        if resolved["precondition"] == "none":
            return featurizer
        from gradindex.methods._ekfac import Preconditioned  # here: plain TracIn does not load the curvature code

        return Preconditioned(featurizer, resolved)
    if method in _FEATURIZERS:
        return __getattr__(_FEATURIZERS[method])(
            task, checkpoints, projection=projection, layers=layers, normalize=normalize, device=device, options=options
        )
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
