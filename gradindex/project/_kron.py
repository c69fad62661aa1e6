"""The factored (LoGra-style) ``kron`` projection: per-layer (k_out × k_in) plans and their seeded side matrices.

For a layer whose per-sample gradient is ``G = Σ_t g_t a_tᵀ`` (``g`` the gradient w.r.t. the layer's output,
``a`` its input, ``t`` over sequence/spatial positions), the projected gradient is
``P_out G P_inᵀ = Σ_t (P_out g_t)(P_in a_t)ᵀ``: a ``k_out × k_in`` block computed from the projected sides,
so ``G`` itself is never formed. This is ``(P_out ⊗ P_in) vec(G)``, a JL projection with Kronecker
structure: inner products are preserved in expectation, and exactly when both sides are full rank (a
side whose k equals its width is the identity, never a random square matrix).

This module knows shapes and seeds only; which modules are layers, and the hooks that capture ``a`` and
``g``, live in ``gradindex.featurize``. Every side matrix comes from a CPU generator seeded with
``derive_seed("kron", seed, checkpoint, parameter name, shape, side)``, never from global RNG state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from gradindex.project._projection import derive_seed

__all__ = ["KronLayer", "KronLayerPlan", "KronPlan", "plan_kron", "kron_side_matrix"]


@dataclass(frozen=True)
class KronLayer:
    """A factorable layer: its gradient is a ``[out_dim, in_dim]`` matrix (the bias, if any, is the last input column)."""

    name: str  # the module's name in the model
    kind: str  # "linear", "conv" or "embedding"
    params: tuple[str, ...]  # the parameter names it covers: weight first, then bias
    in_dim: int
    out_dim: int

    @property
    def numel(self) -> int:
        return self.in_dim * self.out_dim


@dataclass(frozen=True)
class KronLayerPlan:
    layer: KronLayer
    k_in: int
    k_out: int

    @property
    def dim(self) -> int:
        return self.k_in * self.k_out

    def to_dict(self) -> dict:
        return {
            "module": self.layer.name,
            "type": self.layer.kind,
            "params": list(self.layer.params),
            "in": self.layer.in_dim,
            "out": self.layer.out_dim,
            "k_in": self.k_in,
            "k_out": self.k_out,
        }


@dataclass(frozen=True)
class KronPlan:
    """Where each part of the per-checkpoint vector comes from: factored layers first, then the rest.

    ``rest_dim`` is the width given to the parameters that are not factored (sjlt over their per-sample
    gradients, or the identity when it equals ``rest_numel``). ``dim`` = Σ k_in·k_out + rest_dim ≤ the asked dim.
    """

    layers: tuple[KronLayerPlan, ...]
    rest_params: tuple[str, ...]
    rest_numel: int
    rest_dim: int

    @property
    def dim(self) -> int:
        return sum(plan.dim for plan in self.layers) + self.rest_dim

    def to_dict(self) -> list[dict]:
        entries = [plan.to_dict() for plan in self.layers]
        if self.rest_params:
            entries.append(
                {"params": list(self.rest_params), "numel": self.rest_numel, "dim": self.rest_dim,
                 "type": "identity" if self.rest_dim == self.rest_numel else "sjlt"}
            )
        return entries


def _side_error(k: int, width: int) -> float:
    # a full-rank side is the identity (no error); a JL side of width k errs by about 1/√k
    return 0.0 if k >= width else 1.0 / math.sqrt(k)


def _factor(budget: int, in_dim: int, out_dim: int) -> tuple[int, int]:
    """(k_in, k_out) with k_in·k_out ≤ budget that minimises the JL error 1/√k_in + 1/√k_out (full sides err 0)."""
    if budget >= in_dim * out_dim:
        return in_dim, out_dim
    best: tuple[float, int, int, int] | None = None
    for k_out in range(1, min(out_dim, budget) + 1):
        k_in = min(in_dim, budget // k_out)
        if k_in < 1:
            break
        key = (_side_error(k_in, in_dim) + _side_error(k_out, out_dim), -(k_in * k_out), -k_out, k_in)
        if best is None or key < best:
            best = key
    assert best is not None
    return best[3], -best[2]


def _water_fill(budget: int, sizes: Sequence[int]) -> list[int]:
    """Split ``budget`` over groups ∝ √size, none above its size, each at least 1; deterministic."""
    shares = [0] * len(sizes)
    open_groups = list(range(len(sizes)))
    left = budget
    while open_groups:
        weight = sum(math.sqrt(sizes[i]) for i in open_groups)
        full = [i for i in open_groups if left * math.sqrt(sizes[i]) / weight >= sizes[i]]
        if not full:
            for i in open_groups:
                shares[i] = max(1, int(left * math.sqrt(sizes[i]) / weight))
            break
        for i in full:
            shares[i] = sizes[i]
            left -= sizes[i]
        open_groups = [i for i in open_groups if i not in full]
    return shares


def plan_kron(dim: int, layers: Sequence[KronLayer], rest_params: Sequence[str] = (), rest_numel: int = 0) -> KronPlan:
    """The per-layer split of ``dim`` (the per-checkpoint width asked for): a pure function of the shapes.

    Everything fits: every layer full rank and the rest unprojected (exact). Otherwise ``dim`` is water-filled
    over the groups in proportion to √(parameter count), and each layer's share is factored into
    (k_in, k_out) to minimise the JL error; the product may fall a little short of the share.
    """
    if dim <= 0:
        raise ValueError(f"projection dim must be positive, got {dim}")
    sizes = [layer.numel for layer in layers] + ([rest_numel] if rest_params else [])
    if not sizes:
        raise ValueError("the kron projection has no parameters to project")
    if dim < len(sizes):
        raise ValueError(
            f"--proj-dim {dim} is smaller than the {len(sizes)} parameter groups the kron projection splits it over; "
            f"use --proj-dim {len(sizes)} or more, or --layers to index fewer layers"
        )
    shares = _water_fill(dim, sizes)
    plans = tuple(KronLayerPlan(layer, *_factor(share, layer.in_dim, layer.out_dim)) for layer, share in zip(layers, shares))
    rest_dim = min(rest_numel, shares[-1]) if rest_params else 0
    return KronPlan(layers=plans, rest_params=tuple(rest_params), rest_numel=rest_numel if rest_params else 0, rest_dim=rest_dim)


def kron_side_matrix(seed: int, checkpoint: int, layer: KronLayer, side: str, k: int) -> Tensor | None:
    """The ``[width, k]`` projection of one side (``side`` is "in" or "out"), N(0, 1/k) entries; None when k is the full width.

    Returned transposed (width first) so that an embedding's input side is a row lookup.
    """
    width = layer.in_dim if side == "in" else layer.out_dim
    if k >= width:
        return None
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed("kron", seed, checkpoint, layer.params[0], (layer.out_dim, layer.in_dim), side))
    return torch.randn(width, k, generator=generator).mul_(1.0 / math.sqrt(k))
