"""Influence functions (Koh & Liang 2017) and their Arnoldi approximation (Schioppa et al. 2022).

Both use one trained checkpoint θ* and the curvature H of J(θ) = (1/N) Σ ℓ(z_i; θ) + R(θ).
Sign convention (gradindex's): positive = proponent, so the influence of z on q is

    score(q, z) = ∇ℓ(q)ᵀ (H + λI)^{-1} ∇ℓ(z)        (= −I_up,loss of Koh & Liang)

i.e. N · (the rise of q's loss when z is left out of training), to first order.

* ``if`` is asymmetric: the store keeps P∇ℓ(z); a query computes (H + λI)^{-1}∇ℓ(q) in full
  parameter space (exact, CG or LiSSA) and projects it with the same P. With ``--projection none``
  the scores are exact influence. The damping and the solver are query-time choices.
* ``arnoldi`` is symmetric: φ(z) = (Λ + λ)^{-1/2} Uᵀ∇ℓ(z) with (U, Λ) the top-r eigenpairs of H found
  by Arnoldi on Hessian-vector products. U and Λ live in the store's ``transforms/arnoldi_eigenbasis``
  (row 0: Λ; rows 1..p: U), written once by the first worker, so every shard and every query uses the same basis.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from gradindex.featurize import LoadedCheckpoint
from gradindex.featurize._grads import to_device
from gradindex.influence._base import (
    _BuiltinMethod,
    batch_size_of,
    check_gradient_projection,
    check_projection,
    row_dots,
    single_checkpoint,
    tree_slice,
    unit_blocks,
)
from gradindex.influence._curvature import Curvature
from gradindex.influence._options import recorded_options
from gradindex.influence._solvers import CGSolver, ExactSolver, LissaSolver, arnoldi
from gradindex.project import ProjectionSpec
from gradindex.task import Task

if TYPE_CHECKING:
    from gradindex.store import GradientStore

__all__ = ["InfluenceFeaturizer", "ArnoldiFeaturizer", "AUTO_EXACT_PARAMS"]

log = logging.getLogger("gradindex")

AUTO_EXACT_PARAMS = 4096
EIGENBASIS = "arnoldi_eigenbasis"
# per shard: the largest relative change of the self-influence's LiSSA solves over their last iterations
# (above LISSA_TOL, 5%, they had not converged and a GradIndexWarning was raised)
LISSA_CHANGE = "lissa_relative_change"


class _GradientMethod(_BuiltinMethod):
    """What IF and Arnoldi share: one checkpoint, selected parameters, per-sample loss gradients, curvature."""

    def _setup_checkpoint(self, checkpoint: LoadedCheckpoint, model: torch.nn.Module) -> None:
        self._setup_gradients(model, self.task.loss, [checkpoint])
        self.checkpoint = checkpoint
        self._params, self._constants = self._states[0]
        self._curvatures: dict[tuple[str, int], Curvature] = {}

    def curvature(self, kind: str, batch_size: int) -> Curvature:
        key = (kind, batch_size)
        if key not in self._curvatures:
            self._curvatures[key] = Curvature(
                self.task, self.checkpoint.state, self.param_names, self.plans, kind=kind, batch_size=batch_size, device=self.device
            )
        return self._curvatures[key]

    def loss_gradients(self, batch: Any) -> Tensor:
        """``[B, p]`` per-sample gradients of the loss at θ*."""
        batch = to_device(batch, self.device)
        size = batch_size_of(batch)
        parts = [
            self.gradients(tree_slice(batch, start, min(size, start + self.chunk_size)), self._params, self._constants)
            for start in range(0, size, self.chunk_size)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, self.n_params, device=self.device)


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
            key = ("lissa", settings["hessian"], settings["lissa_depth"], settings["lissa_scale"], settings["lissa_repeats"], settings["lissa_batch_size"])
            make = lambda: LissaSolver(  # noqa: E731
                curvature, depth=settings["lissa_depth"], scale=settings["lissa_scale"], repeats=settings["lissa_repeats"],
                batch_size=settings["lissa_batch_size"], seed=self.projection.seed,
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

    def end_shard(self, store: "GradientStore", shard: int) -> None:
        # how far the self-influence's LiSSA solves were from converged (see LissaSolver): kept with the store
        if self.options["solver"] == "lissa":
            store.write_transform_part(LISSA_CHANGE, shard, np.array([self._lissa_change]))
        self._lissa_change = 0.0

    def finish(self, store: "GradientStore") -> None:
        if self.options["solver"] == "lissa":
            parts = store.read_transform_parts(LISSA_CHANGE)
            store.write_transform(LISSA_CHANGE, np.array([float(parts[shard][0]) if shard in parts else np.nan for shard in range(store.n_shards)]))

    def query_vectors(self, batch: Any) -> Tensor:
        """collated batch of B queries -> [B, k]: P(H + λI)^{-1}∇ℓ(q; θ*)."""
        return self._project(self.inverse_hvp(self.loss_gradients(batch)))


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
            raise ValueError(f"--rank {rank} exceeds the {self.n_params} parameters indexed; use --rank {self.n_params} or less")
        if self.options["iterations"] is None:
            self.options["iterations"] = min(self.n_params, max(2 * rank, rank + 20))
        if not rank <= self.options["iterations"] <= self.n_params:
            raise ValueError(
                f"iterations must be between --rank ({rank}) and the parameter count ({self.n_params}), got {self.options['iterations']}"
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
        from gradindex._progress import progress_bar

        curvature = self.curvature(self.options["hessian"], self.options["hvp_batch_size"])
        iterations = self.options["iterations"]
        log.info("arnoldi: %d iterations on %d parameters for the top %d eigenpairs", iterations, self.n_params, self.dim)
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
                + f" plus damping are positive (smallest {float(values.min()):.3g}); use --rank {max(kept, 1)}, "
                "--hessian ggn, or raise --damping"
            )
        self._eigenvalues = values.to(self.device, torch.float64)
        self._eigenvectors = vectors.to(self.device, torch.float64)
        self._scale = shifted.rsqrt().to(self.device, torch.float32)
        self._basis32 = self._eigenvectors.float()

    def attach(self, store: "GradientStore") -> None:
        if EIGENBASIS not in store.transforms():
            values, vectors = self.compute_eigenbasis()
            packed = torch.cat([values.unsqueeze(0), vectors.cpu()]).numpy()
            if store.write_transform(EIGENBASIS, packed, exclusive=True):
                self._use(values, vectors)
                return
        packed = store.read_transform(EIGENBASIS)
        if packed.shape != (self.n_params + 1, self.dim):
            raise ValueError(f"{store.path}'s {EIGENBASIS} has shape {list(packed.shape)}, expected {[self.n_params + 1, self.dim]}; rebuild with --overwrite")
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
