"""Random projections of flattened per-sample gradients, identical in every process on every machine.

Every random number comes from a CPU ``torch.Generator`` seeded with a hash of
(seed, checkpoint position, parameter name, parameter shape, block), never from global RNG state,
so a projection is a pure function of what the manifest records.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor

__all__ = [
    "ProjectionSpec",
    "ParamPlan",
    "Projector",
    "IdentityProjector",
    "DenseProjector",
    "SJLTProjector",
    "make_projector",
    "derive_seed",
]

ProjectionKind = Literal["none", "rademacher", "gaussian", "sjlt", "kron"]
_KINDS = ("none", "rademacher", "gaussian", "sjlt", "kron")


@dataclass(frozen=True, kw_only=True)
class ProjectionSpec:
    """How gradients are projected: kind, output dimension per checkpoint, seed.

    ``kron`` factors Linear/Conv/Embedding layers (see ``gradindex.project._kron``): it needs the model, so
    the featurizer builds it rather than ``make_projector``; its per-layer plan is recorded beside the spec.
    """

    kind: ProjectionKind = "rademacher"
    dim: int = 1024
    seed: int = 0
    sjlt_nnz: int = 4  # buckets per coordinate for sjlt
    # kron only: the per-layer plan a manifest recorded (its "plan" entries), used as is instead of being computed
    # again from calibration data. Not part of what was asked for: two specs differing only here compare equal.
    plan: tuple | None = field(default=None, compare=False)
    # kron only: how a build draws the sides narrower than their width (gaussian, orthogonal or pca; None: the
    # default). A planning choice like the energies: the plan records each layer's sides, and a recorded plan wins.
    kron_sides: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"projection kind must be one of {', '.join(_KINDS)}, got {self.kind!r}")
        if self.dim <= 0:
            raise ValueError(f"projection dim must be positive, got {self.dim}")
        if self.seed < 0:
            raise ValueError(f"projection seed must be non-negative, got {self.seed}")
        if self.sjlt_nnz <= 0:
            raise ValueError(f"sjlt_nnz must be positive, got {self.sjlt_nnz}")
        if self.kron_sides is not None:
            from gradindex.project._kron import SIDES

            if self.kron_sides not in SIDES:
                raise ValueError(f"kron sides must be one of {', '.join(SIDES)}, got {self.kron_sides!r}")
            if self.kind != "kron":
                raise ValueError(f"--kron-sides applies to --projection kron only, not {self.kind}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "seed": self.seed, "sjlt_nnz": self.sjlt_nnz}

    @staticmethod
    def from_dict(data: dict) -> "ProjectionSpec":
        plan = data.get("plan")
        return ProjectionSpec(kind=data["kind"], dim=data["dim"], seed=data["seed"], sjlt_nnz=data.get("sjlt_nnz", 4),
                              plan=tuple(plan) if plan is not None and data["kind"] == "kron" else None)


@dataclass(frozen=True)
class ParamPlan:
    """One parameter's place in the flattened gradient: name, shape, offset."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @staticmethod
    def layout(named_shapes: Sequence[tuple[str, Sequence[int]]]) -> list["ParamPlan"]:
        plans, offset = [], 0
        for name, shape in named_shapes:
            plan = ParamPlan(name, tuple(int(size) for size in shape), offset)
            plans.append(plan)
            offset += plan.numel
        return plans


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from a hash of the parts; stable across processes, platforms and Python versions."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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

    def __init__(self, spec: ProjectionSpec, plans: Sequence[ParamPlan], *, block_bytes: int = 32 << 20, cache_bytes: int = 1 << 30):
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
            matrix = torch.randint(0, 2, (rows, self.spec.dim), generator=generator, dtype=torch.int8).float().mul_(2).sub_(1)
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
        raise ValueError("the kron projection factors layers of a model and is built by the featurizer, not from flattened gradients")
    if spec.kind == "none":
        return IdentityProjector(plans)
    if spec.kind in ("rademacher", "gaussian"):
        return DenseProjector(spec, plans)
    return SJLTProjector(spec, plans)
