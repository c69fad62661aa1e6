"""Projections P: flattened gradients [B, p] -> [B, k], derived only from what the manifest records.

``ProjectionSpec`` says which (kind, dim, seed); ``make_projector`` builds the identity, dense or sparse JL
projector of flattened gradients; the factored ``kron`` projection is planned here (``plan_kron``, side matrices)
and computed by ``gradindex.featurize``, which never forms the per-sample gradient.
"""

from typing import TYPE_CHECKING

from gradindex.projection._spec import KRON_SIDES, PROJECTION_KINDS, ParamPlan, ProjectionSpec, derive_seed
from gradindex.utils import lazy_exports

__all__ = [
    "KRON_SIDES",
    "PCA_MAX_SIDE",
    "PCA_MAX_WIDTH",
    "PROJECTION_KINDS",
    "REST_SIDE",
    "DenseProjector",
    "IdentityProjector",
    "KronLayer",
    "KronLayerPlan",
    "KronPlan",
    "ParamPlan",
    "ProjectionSpec",
    "Projector",
    "SJLTProjector",
    "SideEigen",
    "SideSketch",
    "derive_seed",
    "exact_side_eigen",
    "exact_width",
    "flat_spectrum",
    "kron_side_matrix",
    "make_projector",
    "mix_spectra",
    "pca_flat_matrix",
    "pca_side_matrix",
    "plan_kron",
    "sketch_rank",
    "small_kernel",
    "top_eigen",
    "torch_threads",
]

# these need torch: they load with their first use, so that importing ProjectionSpec stays light
if TYPE_CHECKING:  # loaded on first use (lazy_exports)
    from gradindex.projection._kron_plan import (
        PCA_MAX_SIDE,
        PCA_MAX_WIDTH,
        REST_SIDE,
        KronLayer,
        KronLayerPlan,
        KronPlan,
        flat_spectrum,
        kron_side_matrix,
        mix_spectra,
        pca_flat_matrix,
        pca_side_matrix,
        plan_kron,
    )
    from gradindex.projection._projectors import (
        DenseProjector,
        IdentityProjector,
        Projector,
        SJLTProjector,
        make_projector,
    )
    from gradindex.projection._sketch import (
        SideEigen,
        SideSketch,
        exact_side_eigen,
        exact_width,
        sketch_rank,
        small_kernel,
        top_eigen,
        torch_threads,
    )

__getattr__, __dir__ = lazy_exports(__name__)
