"""Projectors of flattened per-sample gradients ``[B, p] -> [B, k]``: identity, dense JL, sparse JL.

Each random matrix is generated block by block from ``derive_seed`` (see ``_spec``), never held whole for large p.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from gradindex.projection._spec import ParamPlan, ProjectionSpec, derive_seed

__all__ = ["DenseProjector", "IdentityProjector", "Projector", "SJLTProjector", "make_projector"]


class Projector(ABC):
    """Maps flattened per-sample gradients ``[B, p]`` to ``[B, k]`` for one checkpoint."""

    out_dim: int

    @abstractmethod
    def project(self, grads: Tensor, checkpoint: int) -> Tensor:
        """[B, p] -> [B, k]."""


class IdentityProjector(Projector):
    """No projection: exact scores, for small models and for tests."""

    def __init__(self, plans: Sequence[ParamPlan]):
        self.out_dim = sum(plan.numel for plan in plans)

    def project(self, grads: Tensor, checkpoint: int) -> Tensor:
        """[B, p] -> [B, p]."""
        return grads


class _BlockedProjector(Projector):
    """Shared machinery: a per-parameter, per-block random matrix, generated on demand and cached within a budget."""

    def __init__(
        self,
        spec: ProjectionSpec,
        plans: Sequence[ParamPlan],
        *,
        block_bytes: int = 32 << 20,
        cache_bytes: int = 1 << 30,
    ):
        self.spec = spec
        self.plans = list(plans)
        self.out_dim = spec.dim
        self.total = sum(plan.numel for plan in plans)
        self.block_rows = max(1, block_bytes // (4 * spec.dim))
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[int, str, int], object] = {}
        self._cached_bytes = 0

    def _blocks(self, plan: ParamPlan):
        for block, start in enumerate(range(0, plan.numel, self.block_rows)):
            yield block, start, min(plan.numel, start + self.block_rows)

    def _generator(self, checkpoint: int, plan: ParamPlan, block: int) -> torch.Generator:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(derive_seed(self.spec.kind, self.spec.seed, checkpoint, plan.name, plan.shape, block))
        return generator

    def _cached(self, key, make, nbytes: int, device: torch.device):
        value = self._cache.get(key)
        if value is None:
            value = make()
            value = tuple(part.to(device) for part in value) if isinstance(value, tuple) else value.to(device)
            if self._cached_bytes + nbytes <= self.cache_bytes:
                self._cache[key] = value
                self._cached_bytes += nbytes
        return value

    def _check(self, grads: Tensor) -> None:
        if grads.ndim != 2 or grads.shape[1] != self.total:
            raise ValueError(f"expected flattened gradients of shape [B, {self.total}], got {list(grads.shape)}")


class DenseProjector(_BlockedProjector):
    """Dense JL (Rademacher ±1 or Gaussian), scaled by 1/√k so inner products are preserved in expectation."""

    def _matrix(self, checkpoint: int, plan: ParamPlan, block: int, rows: int) -> Tensor:
        generator = self._generator(checkpoint, plan, block)
        if self.spec.kind == "gaussian":
            matrix = torch.randn(rows, self.spec.dim, generator=generator)
        else:
            matrix = (
                torch.randint(0, 2, (rows, self.spec.dim), generator=generator, dtype=torch.int8)
                .float()
                .mul_(2)
                .sub_(1)
            )
        return matrix.mul_(1.0 / math.sqrt(self.spec.dim))

    def project(self, grads: Tensor, checkpoint: int) -> Tensor:
        """[B, p] -> [B, k]."""
        self._check(grads)
        out = torch.zeros(grads.shape[0], self.spec.dim, dtype=torch.float32, device=grads.device)
        for plan in self.plans:
            for block, start, stop in self._blocks(plan):
                matrix = self._cached(
                    (checkpoint, plan.name, block),
                    lambda: self._matrix(checkpoint, plan, block, stop - start),
                    4 * (stop - start) * self.spec.dim,
                    grads.device,
                )
                out.addmm_(grads[:, plan.offset + start : plan.offset + stop].float(), matrix)
        return out


class SJLTProjector(_BlockedProjector):
    """Sparse JL / count-sketch: each coordinate goes to ``sjlt_nnz`` buckets with random signs; O(p) per sample."""

    def __init__(self, spec: ProjectionSpec, plans: Sequence[ParamPlan], **options):
        super().__init__(spec, plans, **options)
        # sparse blocks are cheap: make them larger than dense ones
        self.block_rows = max(self.block_rows, 1 << 20)

    def _sketch(self, checkpoint: int, plan: ParamPlan, block: int, rows: int) -> tuple[Tensor, Tensor]:
        generator = self._generator(checkpoint, plan, block)
        buckets = torch.randint(0, self.spec.dim, (rows, self.spec.sjlt_nnz), generator=generator)
        signs = torch.randint(0, 2, (rows, self.spec.sjlt_nnz), generator=generator).float().mul_(2).sub_(1)
        return buckets, signs.mul_(1.0 / math.sqrt(self.spec.sjlt_nnz))

    def project(self, grads: Tensor, checkpoint: int) -> Tensor:
        """[B, p] -> [B, k]."""
        self._check(grads)
        batch = grads.shape[0]
        out = torch.zeros(batch, self.spec.dim, dtype=torch.float32, device=grads.device)
        for plan in self.plans:
            for block, start, stop in self._blocks(plan):
                buckets, signs = self._cached(
                    (checkpoint, plan.name, block),
                    lambda: self._sketch(checkpoint, plan, block, stop - start),
                    12 * (stop - start) * self.spec.sjlt_nnz,
                    grads.device,
                )
                values = grads[:, plan.offset + start : plan.offset + stop].float().unsqueeze(2) * signs
                out.index_add_(1, buckets.reshape(-1), values.reshape(batch, -1))
        return out


def make_projector(spec: ProjectionSpec, plans: Sequence[ParamPlan]) -> Projector:
    """The projector a spec names, for gradients laid out by ``plans``."""
    if spec.kind == "kron":
        raise ValueError(
            "the kron projection factors layers of a model and is built by the featurizer, not from flattened gradients"
        )
    if spec.kind == "none":
        return IdentityProjector(plans)
    if spec.kind in ("rademacher", "gaussian"):
        return DenseProjector(spec, plans)
    return SJLTProjector(spec, plans)
