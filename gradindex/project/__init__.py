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

__all__ = [
    "DenseProjector",
    "IdentityProjector",
    "ParamPlan",
    "ProjectionSpec",
    "Projector",
    "SJLTProjector",
    "derive_seed",
    "make_projector",
]
