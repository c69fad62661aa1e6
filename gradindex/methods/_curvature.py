"""Curvature of the training objective at one checkpoint, as products with vectors (torch.func).

The objective is the mean training loss plus the task's regularisation,

    J(θ) = (1/N) Σ_i ℓ(z_i; θ) + R(θ),

over the selected parameters (the others are held fixed). ``matvec`` gives H V for a stack of
vectors V in one pass over the training set: forward-over-reverse, ``vmap(jvp(grad(J)))``. With
``kind="ggn"`` the data term is the generalised Gauss-Newton matrix Jᵀ ∇²_f ℓ J of the model outputs f
(positive semi-definite; for the default softmax cross-entropy, ∇²_f ℓ = diag(p) − ppᵀ) and R keeps its
exact Hessian. Every product runs the model in eval mode, like the per-sample gradients, and with torch's
composite ("math") attention: the fused scaled-dot-product kernels have no forward-mode derivative.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from gradindex.errors import ArgumentError, TaskSpecError
from gradindex.featurize import LossModule
from gradindex.projection import ParamPlan
from gradindex.task import Task, cross_entropy_loss, default_loss, gather_batch, logits_of, split_batch

__all__ = ["Curvature"]

log = logging.getLogger("gradindex")


class _Regularizer(nn.Module):
    def __init__(self, model: nn.Module, regularization: Callable[[nn.Module], Tensor]):
        super().__init__()
        self.model = model
        self.regularization = regularization

    def forward(self) -> Tensor:
        return self.regularization(self.model)


class _Outputs(nn.Module):
    def __init__(self, model: nn.Module, label: str | int | None = None):
        super().__init__()
        self.model = model
        self.label = label

    def forward(self, batch: Any) -> Tensor:
        return logits_of(self.model, batch, label=self.label)  # the model called as the default loss calls it


class Curvature:
    """Products with the Hessian (or GGN) of J at one checkpoint: ``matvec(V [m, p]) -> [m, p]``."""

    def __init__(
        self,
        task: Task,
        state: dict[str, Tensor],
        param_names: Sequence[str],
        plans: Sequence[ParamPlan],
        *,
        kind: str = "hessian",
        batch_size: int = 256,
        device: torch.device = torch.device("cpu"),
    ):
        if kind not in ("hessian", "ggn"):
            raise ValueError(f"curvature must be hessian or ggn, got {kind!r}")
        if kind == "ggn" and getattr(task.loss, "func", task.loss) not in (cross_entropy_loss, default_loss):
            raise ArgumentError(
                "hessian",
                "hessian=ggn needs the task's default cross-entropy loss (its output Hessian is known in closed form); "
                "this task has its own loss: use hessian=hessian",
            )
        self.task = task
        self.kind = kind
        self.batch_size = batch_size
        self.device = device
        model = task.model().to(device)
        self._loss = LossModule(model, task.loss).eval()
        self._outputs = _Outputs(model, task.label).eval()
        self._regularizer = _Regularizer(model, task.regularization).eval() if task.regularization is not None else None
        self.plans = list(plans)
        wanted = [f"model.{name}" for name in param_names]
        self._names = wanted
        self._constants = {key: value for key, value in state.items() if key not in set(wanted)}
        self.theta = torch.cat([state[key].detach().reshape(-1).float() for key in wanted]).to(device)
        self.n_params = self.theta.numel()
        self.n_samples = len(task.train)
        if self.n_samples == 0:
            raise TaskSpecError(
                "the task's training set is empty; the Hessian of the training loss needs training samples"
            )

    def key(self) -> tuple:
        """What the matrix depends on besides the task: the curvature kind, the parameters and their values."""
        digest = hashlib.sha1(self.theta.detach().cpu().numpy().tobytes())
        for name in sorted(self._constants):
            value = self._constants[name]
            if isinstance(value, Tensor):
                digest.update(name.encode())
                digest.update(value.detach().cpu().numpy().tobytes())
        return (self.kind, tuple(self._names), self.n_samples, digest.hexdigest())

    # ---- functional pieces ------------------------------------------------------------------
    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        return {
            key: flat[plan.offset : plan.offset + plan.numel].reshape(plan.shape)
            for key, plan in zip(self._names, self.plans)
        }

    def _state(self, flat: Tensor) -> dict[str, Tensor]:
        return {**self._constants, **self._unflatten(flat)}

    def batches(self) -> Any:
        """The training set in order, as batches on the device."""
        for start in range(0, self.n_samples, self.batch_size):
            yield gather_batch(
                self.task.train,
                range(start, min(self.n_samples, start + self.batch_size)),
                self.task.collate,
                self.device,
            )

    def _products(self, batch: Any, vectors: Tensor, weight: float, regularize: bool) -> Tensor:
        """(weight · Σ over the batch of per-sample curvature [+ ∇²R]) · v for every row v of ``vectors``."""
        regularize = regularize and self._regularizer is not None
        if self.kind == "hessian":
            # one forward-over-reverse call for data and regulariser: torch.func's per-call cost dominates small models
            def total(flat: Tensor) -> Tensor:
                state = self._state(flat)
                value = functional_call(self._loss, state, (batch,)).sum() * weight
                return value + functional_call(self._regularizer, state, ()) if regularize else value

            gradient = grad(total)
            return vmap(lambda v: jvp(gradient, (self.theta,), (v,))[1])(vectors)

        def outputs(flat: Tensor) -> Tensor:
            return functional_call(self._outputs, self._state(flat), (batch,))

        logits, pullback = vjp(outputs, self.theta)
        self._check_classifier(logits, batch)
        probs = torch.softmax(logits.detach(), dim=-1)

        def one(v: Tensor) -> Tensor:
            pushed = jvp(outputs, (self.theta,), (v,))[1]
            curved = probs * pushed - probs * (probs * pushed).sum(dim=-1, keepdim=True)
            return pullback(curved)[0] * weight

        products = vmap(one)(vectors)
        if regularize:

            def penalty(flat: Tensor) -> Tensor:
                return functional_call(self._regularizer, self._state(flat), ())

            gradient = grad(penalty)
            products = products + vmap(lambda v: jvp(gradient, (self.theta,), (v,))[1])(vectors)
        return products

    # ---- products ---------------------------------------------------------------------------
    def matvec(self, vectors: Tensor) -> Tensor:
        """H V for ``vectors [m, p]`` (float32): one pass over the training set."""
        vectors = vectors.to(self.device, torch.float32)
        out = torch.zeros_like(vectors)
        with sdpa_kernel(SDPBackend.MATH):
            for position, batch in enumerate(self.batches()):
                out += self._products(batch, vectors, 1.0 / self.n_samples, regularize=position == 0)
        return out

    def matvec_on(self, batch: Any, n_batch: int, vectors: Tensor) -> Tensor:
        """The same product with the data term estimated on one mini-batch of ``n_batch`` samples (LiSSA)."""
        with sdpa_kernel(SDPBackend.MATH):
            return self._products(batch, vectors.to(self.device, torch.float32), 1.0 / n_batch, regularize=True)

    def dense(self, chunk: int = 64) -> Tensor:
        """The whole ``[p, p]`` matrix (float64).

        The Gauss-Newton matrix is assembled from per-sample output Jacobians, G = (1/N) Σ_i J_iᵀ H_i J_i,
        i.e. C backward passes per sample and one matrix product, instead of p products with G (each a pass
        over the data): on a 3,274-parameter CNN with 4,000 samples, seconds instead of minutes. The Hessian,
        and any model whose batch vmap cannot split per sample, falls back to products with the identity.
        """
        if self.kind == "ggn":
            try:
                with sdpa_kernel(SDPBackend.MATH):
                    return self._dense_ggn()
            except (RuntimeError, ValueError, TypeError) as error:  # e.g. a model or batch vmap cannot split per sample
                log.info("per-sample Jacobians failed (%s); assembling the Gauss-Newton matrix from products", error)
        return self._dense_from_products(torch.arange(self.n_params, device=self.device), chunk)

    def _dense_from_products(self, columns: Tensor, chunk: int, regularizer_only: bool = False) -> Tensor:
        p = self.n_params
        matrix = torch.empty(p, p, dtype=torch.float64, device=self.device)
        for start in range(0, p, chunk):
            stop = min(p, start + chunk)
            basis = torch.zeros(stop - start, p, device=self.device)
            basis[torch.arange(stop - start), columns[start:stop]] = 1.0
            if regularizer_only:
                matrix[start:stop] = self._regularizer_products(basis).double()
            else:
                matrix[start:stop] = self.matvec(basis).double()
        return 0.5 * (matrix + matrix.T)

    def _regularizer_products(self, vectors: Tensor) -> Tensor:
        """∇²R · v for every row v of ``vectors``."""

        def penalty(flat: Tensor) -> Tensor:
            return functional_call(self._regularizer, self._state(flat), ())

        gradient = grad(penalty)
        return vmap(lambda v: jvp(gradient, (self.theta,), (v,))[1])(vectors)

    def _check_classifier(self, logits: Tensor, batch: Any) -> None:
        """The closed-form output Hessian is that of one softmax cross-entropy per sample: logits ``[B, C]`` against
        integer labels ``[B]``; a causal LM's ``[B, T, V]`` or a regression would be curved wrongly: refused."""
        labels = split_batch(batch, self.task.label)[1]
        if logits.ndim != 2 or not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point():
            shown = f"labels {tuple(labels.shape)}" if isinstance(labels, Tensor) else "no labels"
            raise ArgumentError(
                "hessian",
                f"hessian=ggn is for classifiers (logits [B, C], integer labels [B]); this task's model gives logits "
                f"{tuple(logits.shape)} and {shown}: use hessian=hessian",
            )

    def _dense_ggn(self, chunk: int = 128) -> Tensor:
        p = self.n_params
        matrix = torch.zeros(p, p, dtype=torch.float64, device=self.device)

        def outputs_one(flat: Tensor, sample: Any) -> Tensor:
            single = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), sample)
            return functional_call(self._outputs, self._state(flat), (single,))[0]

        jacobians = vmap(jacrev(outputs_one), in_dims=(None, 0))
        for start in range(0, self.n_samples, chunk):
            batch = gather_batch(
                self.task.train, range(start, min(self.n_samples, start + chunk)), self.task.collate, self.device
            )
            with torch.no_grad():
                logits = functional_call(self._outputs, self._state(self.theta), (batch,))
            self._check_classifier(logits, batch)
            jac = jacobians(self.theta, batch)  # [B, C, p]
            probs = torch.softmax(logits, dim=-1).unsqueeze(-1)
            curved = probs * jac - probs * (probs * jac).sum(dim=1, keepdim=True)  # H_i J_i, H_i = diag(p) − ppᵀ
            matrix += (jac.reshape(-1, p).T @ curved.reshape(-1, p)).double()
        matrix /= self.n_samples
        if self._regularizer is not None:
            matrix += self._dense_from_products(torch.arange(p, device=self.device), 256, regularizer_only=True)
        return 0.5 * (matrix + matrix.T)

    def largest_eigenvalue(self, *, iterations: int = 30, seed: int = 0) -> float:
        """A power-iteration estimate of the largest-magnitude eigenvalue (for LiSSA's scale)."""
        generator = torch.Generator().manual_seed(seed)
        vector = torch.randn(self.n_params, generator=generator, dtype=torch.float64).to(self.device)
        vector /= vector.norm()
        value = 0.0
        for _ in range(iterations):
            product = self.matvec(vector.float().unsqueeze(0))[0].double()
            value = float(vector @ product)
            norm = float(product.norm())
            if not math.isfinite(norm) or norm == 0.0:
                break
            vector = product / norm
        return abs(value)
