"""Projections P: flattened gradients [B, p] -> [B, k], derived only from what the manifest records."""

from gradindex.project._projection import (
    DenseProjector,
    IdentityProjector,
    ParamPlan,
    ProjectionSpec,
    Projector,
    SJLTProjector,
    derive_seed,
    make_projector,
)
from gradindex.project._kron import KronLayer, KronLayerPlan, KronPlan, kron_side_matrix, plan_kron

__all__ = [
    "DenseProjector",
    "IdentityProjector",
    "KronLayer",
    "KronLayerPlan",
    "KronPlan",
    "ParamPlan",
    "ProjectionSpec",
    "Projector",
    "SJLTProjector",
    "derive_seed",
    "kron_side_matrix",
    "make_projector",
    "plan_kron",
]
