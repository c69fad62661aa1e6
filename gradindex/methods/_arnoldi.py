"""Arnoldi influence (Schioppa et al. 2022): φ(z) = (Λ + λ)^{-1/2} Uᵀ∇ℓ(z; θ*) with (U, Λ) the top-r eigenpairs of the
Hessian (or GGN) of the training objective at θ*, found by Arnoldi on Hessian-vector products.

Symmetric: ⟨φ(q), φ(z)⟩ is influence in the top-r eigenspace. U and Λ live in the store's
``transforms/arnoldi_eigenbasis`` (row 0: Λ; rows 1..p: U), written once by the first worker, so every shard and
every query uses the same basis.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from gradindex.errors import ArgumentError
from gradindex.featurize import LoadedCheckpoint
from gradindex.methods._base import _GradientMethod, check_projection, single_checkpoint, unit_blocks
from gradindex.methods._options import recorded_options
from gradindex.methods._solvers import arnoldi
from gradindex.projection import ProjectionSpec
from gradindex.task import Task
from gradindex.utils import progress_bar

if TYPE_CHECKING:
    from gradindex.store import GradientStore

__all__ = ["EIGENBASIS", "ArnoldiFeaturizer"]

log = logging.getLogger("gradindex")

EIGENBASIS = "arnoldi_eigenbasis"


class ArnoldiFeaturizer(_GradientMethod):
    """``arnoldi``: φ(z) = (Λ + λ)^{-1/2} Uᵀ∇ℓ(z; θ*), (U, Λ) the top-r eigenpairs of H."""

    symmetric = True

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
        check_projection("arnoldi", projection)
        checkpoint = single_checkpoint("arnoldi", checkpoints)
        model = self._setup("arnoldi", task, layers=layers, normalize=normalize, device=device, options=options)
        self._setup_checkpoint(checkpoint, model)
        self.seed = projection.seed
        rank = self.options["rank"]
        if rank > self.n_params:
            raise ArgumentError(
                "rank", f"rank={rank} exceeds the {self.n_params} parameters indexed; use rank={self.n_params} or less"
            )
        if self.options["iterations"] is None:
            self.options["iterations"] = min(self.n_params, max(2 * rank, rank + 20))
        if not rank <= self.options["iterations"] <= self.n_params:
            raise ArgumentError(
                "iterations",
                f"iterations must be between the rank ({rank}) and the parameter count ({self.n_params}), got "
                f"{self.options['iterations']}",
            )
        self.dim = rank
        self._eigenvalues: Tensor | None = None
        self._eigenvectors: Tensor | None = None

    def fingerprint(self) -> dict:
        return {
            "method": {"name": "arnoldi", "normalize": self.normalize, **recorded_options("arnoldi", self.options)},
            "projection": ProjectionSpec(kind="none", dim=self.dim, seed=self.seed).to_dict(),
            "layers": self.layers,
            "params": [[plan.name, list(plan.shape)] for plan in self.plans],
            "block_dim": self.dim,
        }

    def compute_eigenbasis(self) -> tuple[Tensor, Tensor]:
        """``(Λ [r], U [p, r])`` float64 by Arnoldi on curvature products."""
        curvature = self.curvature(self.options["hessian"], self.options["hvp_batch_size"])
        iterations = self.options["iterations"]
        log.info(
            "arnoldi: %d iterations on %d parameters for the top %d eigenpairs", iterations, self.n_params, self.dim
        )
        with progress_bar(iterations, "arnoldi", unit="HVP") as bar:

            def matvec(vectors: Tensor) -> Tensor:
                bar.update(1)
                return curvature.matvec(vectors)

            return arnoldi(matvec, self.n_params, self.dim, iterations, seed=self.seed, device=self.device)

    def _use(self, values: Tensor, vectors: Tensor) -> None:
        shifted = values + self.options["damping"]
        if float(shifted.min()) <= 1e-12 * max(float(values.abs().max()), 1e-30):
            kept = int((shifted > 0).sum())
            raise ValueError(
                f"only {kept} of the top {self.dim} eigenvalues of the "
                + ("Hessian" if self.options["hessian"] == "hessian" else "Gauss-Newton matrix")
                + f" plus damping are positive (smallest {float(values.min()):.3g}); use rank={max(kept, 1)}, "
                "hessian=ggn, or a larger damping"
            )
        self._eigenvalues = values.to(self.device, torch.float64)
        self._eigenvectors = vectors.to(self.device, torch.float64)
        self._scale = shifted.rsqrt().to(self.device, torch.float32)
        self._basis32 = self._eigenvectors.float()

    def attach(self, store: GradientStore) -> None:
        if EIGENBASIS not in store.transforms():
            values, vectors = self.compute_eigenbasis()
            packed = torch.cat([values.unsqueeze(0), vectors.cpu()]).numpy()
            if store.write_transform(EIGENBASIS, packed, exclusive=True):
                self._use(values, vectors)
                return
        packed = store.read_transform(EIGENBASIS)
        if packed.shape != (self.n_params + 1, self.dim):
            raise ValueError(
                f"{store.path}'s {EIGENBASIS} has shape {list(packed.shape)}, expected "
                f"{[self.n_params + 1, self.dim]}; rebuild with overwrite=True"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(packed))
        self._use(tensor[0], tensor[1:])

    def _ensure_basis(self) -> None:
        if self._eigenvectors is None:
            self._use(*self.compute_eigenbasis())

    @property
    def eigenvalues(self) -> Tensor:
        self._ensure_basis()
        return self._eigenvalues

    @property
    def eigenvectors(self) -> Tensor:
        self._ensure_basis()
        return self._eigenvectors

    def featurize(self, batch: Any) -> Tensor:
        """collated batch of B samples -> [B, r]."""
        self._ensure_basis()
        coords = (self.loss_gradients(batch).double() @ self._eigenvectors).float() * self._scale
        return unit_blocks(coords, self.dim) if self.normalize else coords
