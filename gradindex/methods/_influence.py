"""Influence functions (Koh & Liang 2017): the store keeps P∇ℓ(z; θ*), a query applies (H + λI)^{-1} in full
parameter space (exact, CG or LiSSA) and projects with the same P.

One trained checkpoint θ* and the curvature H of J(θ) = (1/N) Σ ℓ(z_i; θ) + R(θ). Sign convention (gradindex's):
positive = proponent, so the influence of z on q is

    score(q, z) = ∇ℓ(q)ᵀ (H + λI)^{-1} ∇ℓ(z)        (= −I_up,loss of Koh & Liang)

i.e. N · (the rise of q's loss when z is left out of training), to first order. The store is asymmetric: with
``--projection none`` the scores are exact influence; the damping and the solver are query-time choices.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from gradindex.featurize import LoadedCheckpoint
from gradindex.methods._base import _GradientMethod, check_gradient_projection, row_dots, single_checkpoint, unit_blocks
from gradindex.methods._solvers import CGSolver, ExactSolver, LissaSolver
from gradindex.projection import ProjectionSpec
from gradindex.task import Task

if TYPE_CHECKING:
    from gradindex.store import GradientStore

__all__ = ["AUTO_EXACT_PARAMS", "InfluenceFeaturizer"]

log = logging.getLogger("gradindex")

AUTO_EXACT_PARAMS = 4096
# per shard: the largest relative change of the self-influence's LiSSA solves over their last iterations
# (above LISSA_TOL, 5%, they had not converged and a GradIndexWarning was raised)
LISSA_CHANGE = "lissa_relative_change"


class InfluenceFeaturizer(_GradientMethod):
    """``if``: stored P∇ℓ(z); query P(H + λI)^{-1}∇ℓ(q); self-influence ⟨P(H + λI)^{-1}∇ℓ(z), P∇ℓ(z)⟩."""

    symmetric = False

    def __init__(
        self,
        task: Task,
        checkpoints: Sequence[LoadedCheckpoint],
        *,
        projection: ProjectionSpec,
        layers: Sequence[str] | None = None,
        normalize: bool = False,
        device: torch.device = torch.device("cpu"),
        options: Mapping[str, Any] | None = None,
    ):
        check_gradient_projection("if", projection)
        checkpoint = single_checkpoint("if", checkpoints)
        model = self._setup("if", task, layers=layers, normalize=normalize, device=device, options=options)
        self._setup_checkpoint(checkpoint, model)
        self._setup_projection(projection)
        self.dim = self.block_dim
        if self.options["solver"] == "auto":
            self.options["solver"] = "exact" if self.n_params <= AUTO_EXACT_PARAMS else "cg"
        self.query_settings = dict(self.options)
        self._solvers: dict[tuple, Any] = {}
        self._lissa_change = 0.0  # the worst LissaSolver.relative_change of this shard's self-influence solves

    def fingerprint(self) -> dict:
        return self._projected_fingerprint()

    def configure_query(self, options: Mapping[str, Any], store_path: Any = "this store") -> None:
        super().configure_query(options, store_path)
        if self.query_settings["solver"] == "auto":
            self.query_settings["solver"] = "exact" if self.n_params <= AUTO_EXACT_PARAMS else "cg"

    def _solver(self, settings: Mapping[str, Any]):
        curvature = self.curvature(settings["hessian"], settings["hvp_batch_size"])
        name = settings["solver"]
        if name == "exact":
            key: tuple = ("exact", settings["hessian"])
            make = lambda: ExactSolver(curvature)  # noqa: E731
        elif name == "cg":
            key = ("cg", settings["hessian"], settings["cg_max_iter"], settings["cg_tol"])
            make = lambda: CGSolver(curvature, max_iter=settings["cg_max_iter"], tol=settings["cg_tol"])  # noqa: E731
        else:
            key = (
                "lissa",
                settings["hessian"],
                settings["lissa_depth"],
                settings["lissa_scale"],
                settings["lissa_repeats"],
                settings["lissa_batch_size"],
            )
            make = lambda: LissaSolver(  # noqa: E731
                curvature,
                depth=settings["lissa_depth"],
                scale=settings["lissa_scale"],
                repeats=settings["lissa_repeats"],
                batch_size=settings["lissa_batch_size"],
                seed=self.projection.seed,
            )
        if key not in self._solvers:
            self._solvers[key] = make()
        return self._solvers[key]

    def inverse_hvp(self, grads: Tensor, settings: Mapping[str, Any] | None = None) -> Tensor:
        """``[B, p] -> [B, p]``: (H + λI)^{-1} applied to each row, with the query settings by default."""
        settings = self.query_settings if settings is None else settings
        return self._solver(settings).solve(grads, settings["damping"]).to(grads.device)

    def _project(self, grads: Tensor) -> Tensor:
        block = self.projector.project(grads, 0)
        return unit_blocks(block, self.block_dim) if self.normalize else block

    def featurize(self, batch: Any) -> Tensor:
        """collated batch of B samples -> [B, k]: P∇ℓ(z; θ*)."""
        return self._project(self.loss_gradients(batch))

    def featurize_train(self, batch: Any) -> tuple[Tensor, Tensor]:
        grads = self.loss_gradients(batch)
        vectors = self._project(grads)
        transformed = self._project(self.inverse_hvp(grads, self.options))
        solver = self._solver(self.options)
        if isinstance(solver, LissaSolver):
            self._lissa_change = max(self._lissa_change, solver.relative_change)
        return vectors, row_dots(transformed, vectors)

    def end_shard(self, store: GradientStore, shard: int) -> None:
        # how far the self-influence's LiSSA solves were from converged (see LissaSolver): kept with the store
        if self.options["solver"] == "lissa":
            store.write_transform_part(LISSA_CHANGE, shard, np.array([self._lissa_change]))
        self._lissa_change = 0.0

    def finish(self, store: GradientStore) -> None:
        if self.options["solver"] == "lissa":
            parts = store.read_transform_parts(LISSA_CHANGE)
            store.write_transform(
                LISSA_CHANGE,
                np.array([float(parts[shard][0]) if shard in parts else np.nan for shard in range(store.n_shards)]),
            )

    def query_vectors(self, batch: Any) -> Tensor:
        """collated batch of B queries -> [B, k]: P(H + λI)^{-1}∇ℓ(q; θ*)."""
        return self._project(self.inverse_hvp(self.loss_gradients(batch)))
