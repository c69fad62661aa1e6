"""Attribution methods beyond TracIn: GEX, influence functions (exact, CG, LiSSA), Arnoldi and TRAK.

Every method is a featurizer (``φ`` per sample) plus, for asymmetric ones, a query-side transform;
all of them share the one store format and the one inner-product index. ``make_method_featurizer``
builds one by name; ``gradindex.methods.make_featurizer`` is the registry the pipeline calls.

=========  ==============================================  ====================================  =========
method     stored row φ(z)                                 query vector                          symmetric
=========  ==============================================  ====================================  =========
gex        (1/√M)[ℓ(z; θ_m) − max(ℓ(z; θ*), τ)]_m          φ(q)                                  yes
if         P∇ℓ(z; θ*)                                      P(H + λI)^{-1}∇ℓ(q; θ*)               no
arnoldi    (Λ + λ)^{-1/2}Uᵀ∇ℓ(z; θ*)                       φ(q)                                  yes
trak       Q(z)[P_c∇f(z; θ_c)]_c                           (1/C)[(Φ_cᵀΦ_c + λI)^{-1}P_c∇f(q)]_c  no
=========  ==============================================  ====================================  =========
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from gradindex.featurize import LoadedCheckpoint
from gradindex.influence._base import MethodFeaturizer, as_method_featurizer, row_dots
from gradindex.influence._curvature import Curvature
from gradindex.influence._gex import GexFeaturizer
from gradindex.influence._influence import ArnoldiFeaturizer, InfluenceFeaturizer
from gradindex.influence._options import METHOD_OPTIONS, QUERY_TIME_OPTIONS, OptionSpec, resolve_options
from gradindex.influence._self_influence import finish_store, recompute_self_influence, stored_self_influence
from gradindex.influence._solvers import CGSolver, ExactSolver, LissaSolver, arnoldi
from gradindex.influence._trak import GramInverse, TrakFeaturizer, trak_self_influence
from gradindex.project import ProjectionSpec
from gradindex.task import Task

__all__ = [
    "ArnoldiFeaturizer",
    "CGSolver",
    "Curvature",
    "ExactSolver",
    "GexFeaturizer",
    "GramInverse",
    "InfluenceFeaturizer",
    "LissaSolver",
    "METHOD_OPTIONS",
    "MethodFeaturizer",
    "OptionSpec",
    "QUERY_TIME_OPTIONS",
    "TrakFeaturizer",
    "arnoldi",
    "as_method_featurizer",
    "finish_store",
    "make_method_featurizer",
    "recompute_self_influence",
    "resolve_options",
    "row_dots",
    "stored_self_influence",
    "trak_self_influence",
]

_FEATURIZERS = {
    "gex": GexFeaturizer,
    "if": InfluenceFeaturizer,
    "arnoldi": ArnoldiFeaturizer,
    "trak": TrakFeaturizer,
}


def make_method_featurizer(
    method: str,
    task: Task,
    checkpoints: Sequence[LoadedCheckpoint],
    *,
    projection: ProjectionSpec,
    layers: Sequence[str] | None = None,
    normalize: bool = False,
    device: torch.device = torch.device("cpu"),
    options: Mapping[str, Any] | None = None,
) -> MethodFeaturizer:
    """The featurizer of ``gex``, ``if``, ``arnoldi`` or ``trak``."""
    if method not in _FEATURIZERS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(_FEATURIZERS)}")
    return _FEATURIZERS[method](task, checkpoints, projection=projection, layers=layers, normalize=normalize, device=device, options=options)
