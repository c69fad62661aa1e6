"""What a projection is: its spec (kind, dimension, seed), the choices it offers, and the seeds it derives.

Every random number of every projection comes from a CPU ``torch.Generator`` seeded with ``derive_seed`` of
(seed, checkpoint position, parameter name, parameter shape, block), never from global RNG state, so a
projection is a pure function of what the manifest records.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from gradindex.errors import ArgumentError
from gradindex.utils import check_settings, setting

__all__ = ["KRON_SIDES", "PROJECTION_KINDS", "ParamPlan", "ProjectionSpec", "derive_seed"]

ProjectionKind = Literal["none", "rademacher", "gaussian", "sjlt", "kron"]
# every projection kind, with what it is (the command line's choices and help come from here)
PROJECTION_KINDS: dict[str, str] = {
    "kron": "factored per layer (LoGra-style): no per-sample gradient is formed; the default of tracin",
    "none": "no projection: exact scores, for small models and tests",
    "rademacher": "dense ±1 JL matrix, generated block by block from the seed; the default of the other methods",
    "gaussian": "dense Gaussian JL matrix, generated block by block from the seed",
    "sjlt": "sparse JL (count-sketch): each coordinate to a few buckets with random signs, O(p) per sample",
}
# how kron projects a layer side narrower than its width
KRON_SIDES: dict[str, str] = {
    "pca": "the top directions of the calibration samples' gradients, kept in the store (the default)",
    "orthogonal": "a seeded Gaussian matrix with orthonormalised columns",
    "gaussian": "a seeded Gaussian matrix",
}


@dataclass(frozen=True, kw_only=True)
class ProjectionSpec:
    """How gradients are projected: kind, output dimension per checkpoint, seed.

    ``kron`` factors Linear/Conv/Embedding layers (see ``plan_kron``): it needs the model, so
    the featurizer builds it rather than ``make_projector``; its per-layer plan is recorded beside the spec.
    """

    kind: ProjectionKind = setting("rademacher", "projection kind", choices=PROJECTION_KINDS)
    dim: int = setting(1024, "output dimension per checkpoint", minimum=1, integer=True)
    seed: int = setting(0, "seed of every random matrix", minimum=0, integer=True)
    sjlt_nnz: int = setting(4, "sjlt: buckets per coordinate", minimum=1, integer=True)
    # kron only: the per-layer plan a manifest recorded (its "plan" entries), used as is instead of being computed
    # again from calibration data. Not part of what was asked for: two specs differing only here compare equal.
    plan: tuple | None = field(default=None, compare=False)
    # kron only: how a build draws the sides narrower than their width (gaussian, orthogonal or pca; None: the
    # default). A planning choice like the energies: the plan records each layer's sides, and a recorded plan wins.
    kron_sides: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.kron_sides is not None:
            if self.kron_sides not in KRON_SIDES:
                raise ValueError(f"kron sides must be one of {', '.join(sorted(KRON_SIDES))}, got {self.kron_sides!r}")
            if self.kind != "kron":
                raise ArgumentError(
                    "kron_sides", f"kron_sides applies to projection=kron only, not projection={self.kind}"
                )

    def to_dict(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "seed": self.seed, "sjlt_nnz": self.sjlt_nnz}

    @staticmethod
    def from_dict(data: dict) -> ProjectionSpec:
        plan = data.get("plan")
        return ProjectionSpec(
            kind=data["kind"],
            dim=data["dim"],
            seed=data["seed"],
            sjlt_nnz=data.get("sjlt_nnz", 4),
            plan=tuple(plan) if plan is not None and data["kind"] == "kron" else None,
        )


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
    def layout(named_shapes: Sequence[tuple[str, Sequence[int]]]) -> list[ParamPlan]:
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
