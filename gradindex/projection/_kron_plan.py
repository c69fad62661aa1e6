"""The factored (LoGra-style) ``kron`` projection: per-layer (k_out × k_in) plans and their side matrices.

For a layer whose per-sample gradient is ``G = Σ_t g_t a_tᵀ`` (``g`` the gradient w.r.t. the layer's output,
``a`` its input, ``t`` over sequence/spatial positions), the projected gradient is
``P_out G P_inᵀ = Σ_t (P_out g_t)(P_in a_t)ᵀ``: a ``k_out × k_in`` block computed from the projected sides,
so ``G`` itself is never formed. This is ``(P_out ⊗ P_in) vec(G)``, a JL projection with Kronecker
structure: inner products are preserved in expectation, and exactly when both sides are full rank (a
side whose k equals its width is the identity, never a random square matrix).

This module knows shapes, seeds and per-group energies only; which modules are layers, the hooks that capture
``a`` and ``g``, and the calibration that measures each group's gradient energy live in ``gradindex.featurize``
(and the calibration in ``gradindex.methods``' TracIn).
The plan (k_in × k_out per layer) depends on that calibration, so a build records it in the manifest and every
later use reads it back (``KronPlan.from_dict``) instead of planning again. Every side matrix comes from a CPU
generator seeded with ``derive_seed("kron", seed, checkpoint, parameter name, shape, side)``, never from global
RNG state; ``orthogonal`` sides orthonormalise that Gaussian in float64 (LAPACK QR) before rounding to float32.

``pca`` sides (the build default, as LoGra's PCA initialisation) are data-dependent instead: the top-k eigenvectors of
each side's gradient-weighted second moment over the calibration samples (``pca_side_matrix``). They are no longer an
unbiased JL sketch but keep the directions that carry most of the gradient energy (held-out Spearman to exact scores
at k = 1024 on the speed benchmark's workloads, ``python -m benchmarks.speed.pca_sides``: MLP 0.888 → 0.997, CNN
0.981 → 0.994, transformer LM 0.431 → 0.835). Because they cannot be re-derived from a seed, a build stores them
(``transforms/kron_sides``) and every later use reads them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gradindex.projection._spec import KRON_SIDES, derive_seed
from gradindex.utils import check_positive_int

__all__ = [
    "PCA_MAX_WIDTH",
    "KronLayer",
    "KronLayerPlan",
    "KronPlan",
    "kron_side_matrix",
    "pca_side_matrix",
    "plan_kron",
]


@dataclass(frozen=True)
class KronLayer:
    """A factorable layer: its gradient is a ``[out_dim, in_dim]`` matrix (the bias, if any, is the last input
    column)."""

    name: str  # the module's name in the model
    kind: str  # "linear", "conv" or "embedding"
    params: tuple[str, ...]  # the parameter names it covers: weight first, then bias
    in_dim: int
    out_dim: int

    @property
    def numel(self) -> int:
        return self.in_dim * self.out_dim


SIDES = tuple(sorted(KRON_SIDES))
# a pca side wider than this draws orthogonal sides instead (its [width, width] float64 moment would pass 128 MiB);
# an embedding's input side has no such limit (its moment is diagonal: token counts)
PCA_MAX_WIDTH = 4096


@dataclass(frozen=True)
class KronLayerPlan:
    layer: KronLayer
    k_in: int
    k_out: int
    sides: str = "gaussian"  # how a side narrower than its width is drawn: see kron_side_matrix (pca: from calibration)

    def narrow_sides(self) -> list[tuple[str, int, int]]:
        """``(side, width, k)`` of each side that is projected (k below its width), "in" first."""
        return [
            (side, width, k)
            for side, width, k in (("in", self.layer.in_dim, self.k_in), ("out", self.layer.out_dim, self.k_out))
            if k < width
        ]

    @property
    def dim(self) -> int:
        return self.k_in * self.k_out

    def to_dict(self) -> dict:
        entry = {
            "module": self.layer.name,
            "type": self.layer.kind,
            "params": list(self.layer.params),
            "in": self.layer.in_dim,
            "out": self.layer.out_dim,
            "k_in": self.k_in,
            "k_out": self.k_out,
        }
        if self.sides != "gaussian":
            entry["sides"] = self.sides
        return entry


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
            rest = {
                "params": list(self.rest_params),
                "numel": self.rest_numel,
                "dim": self.rest_dim,
                "type": "identity" if self.rest_dim == self.rest_numel else "sjlt",
            }
            entries.append(rest)
        return entries

    @staticmethod
    def from_dict(
        entries: Sequence[dict], layers: Sequence[KronLayer], rest_params: Sequence[str] = (), rest_numel: int = 0
    ) -> KronPlan:
        """The plan a manifest recorded, checked against the model's factorable layers (what ``to_dict`` wrote).

        A recorded plan is never recomputed: it comes from calibration data (gradient energies) that a query, a
        resumed build, another worker or an append (a grown data set) may not see in the same way.
        """
        recorded = [entry for entry in entries if "module" in entry]
        rests = [entry for entry in entries if "module" not in entry and "params" in entry]
        found = [(layer.name, layer.kind, list(layer.params), layer.in_dim, layer.out_dim) for layer in layers]
        wanted = [
            (entry["module"], entry["type"], list(entry["params"]), entry["in"], entry["out"]) for entry in recorded
        ]
        if found != wanted or [list(rest["params"]) for rest in rests] != ([list(rest_params)] if rest_params else []):
            raise ValueError(
                f"the recorded kron plan does not fit this model: it factors {[entry[0] for entry in wanted]} "
                f"(the model has {[entry[0] for entry in found]}) and projects {[rest['params'] for rest in rests]} "
                "with sjlt "
                f"(the model: {list(rest_params)}); use the model (task) and the layers the store was built with"
            )
        plans = []
        for layer, entry in zip(layers, recorded):
            k_in, k_out, sides = int(entry["k_in"]), int(entry["k_out"]), entry.get("sides", "gaussian")
            if not (1 <= k_in <= layer.in_dim and 1 <= k_out <= layer.out_dim) or sides not in SIDES:
                raise ValueError(
                    f"the recorded kron plan of {layer.name} is invalid ({entry}): the store's manifest was edited or "
                    "damaged; "
                    "rebuild the store with overwrite=True"
                )
            plans.append(KronLayerPlan(layer, k_in, k_out, sides=sides))
        rest = rests[0] if rests else None
        return KronPlan(
            layers=tuple(plans),
            rest_params=tuple(rest_params),
            rest_numel=rest_numel if rest_params else 0,
            rest_dim=int(rest["dim"]) if rest else 0,
        )


def _side_variance(k: int, width: int, sides: str) -> float:
    """Relative variance a side of width ``width`` projected to ``k`` adds: none when full rank (the identity);
    about 1/k for Gaussian rows, (1/k)(1 - k/width) for orthogonal ones (exact when k = width)."""
    if k >= width:
        return 0.0
    return (1.0 - k / width) / k if sides in ("orthogonal", "pca") else 1.0 / k


def _factor(budget: int, in_dim: int, out_dim: int, sides: str = "gaussian") -> tuple[int, int]:
    """(k_in, k_out) with k_in·k_out ≤ budget that minimises the variance of the Kronecker JL product,
    v_in + v_out + v_in·v_out (a full-rank side adds none), then uses the most of the budget."""
    if budget >= in_dim * out_dim:
        return in_dim, out_dim
    best: tuple[float, int, int, int] | None = None
    for k_out in range(1, min(out_dim, budget) + 1):
        k_in = min(in_dim, budget // k_out)
        if k_in < 1:
            break
        v_in, v_out = _side_variance(k_in, in_dim, sides), _side_variance(k_out, out_dim, sides)
        key = (round(v_in + v_out + v_in * v_out, 12), -(k_in * k_out), -k_out, k_in)
        if best is None or key < best:
            best = key
    assert best is not None
    return best[3], -best[2]


def _water_fill(budget: int, sizes: Sequence[int], weights: Sequence[float] | None = None) -> list[int]:
    """Split ``budget`` over groups ∝ weight (default √size), each at least 1 and at most its size; deterministic.

    Every group first gets 1; the rest is poured in proportion to the weights into the groups not yet full
    (a group that would overflow is capped at its size and the pour repeats over the others); the integer
    remainder goes to the largest fractional parts. The shares sum to min(budget, Σ sizes).
    """
    if weights is None:
        weights = [math.sqrt(size) for size in sizes]
    weights = [max(0.0, float(weight)) for weight in weights]
    if not any(weight > 0 for weight in weights):
        weights = [math.sqrt(size) for size in sizes]
    shares = [1.0] * len(sizes)
    left = budget - len(sizes)
    open_groups = [i for i in range(len(sizes)) if sizes[i] > 1 and weights[i] > 0]
    while open_groups and left > 1e-9:
        total = sum(weights[i] for i in open_groups)
        full = [i for i in open_groups if shares[i] + left * weights[i] / total >= sizes[i]]
        if not full:
            for i in open_groups:
                shares[i] += left * weights[i] / total
            break
        for i in full:
            left -= sizes[i] - shares[i]
            shares[i] = float(sizes[i])
        open_groups = [i for i in open_groups if i not in full]
    whole = [int(share) for share in shares]
    spare = min(budget, sum(sizes)) - sum(whole)
    order = sorted((i for i in range(len(sizes)) if whole[i] < sizes[i]), key=lambda i: (-(shares[i] - whole[i]), i))
    for i in order[: max(0, spare)]:
        whole[i] += 1
    return whole


def plan_kron(
    dim: int,
    layers: Sequence[KronLayer],
    rest_params: Sequence[str] = (),
    rest_numel: int = 0,
    energies: Sequence[float] | None = None,
    sides: str = "gaussian",
) -> KronPlan:
    """The per-layer split of ``dim`` (the per-checkpoint width asked for).

    Everything fits: every layer full rank and the rest unprojected (exact). Otherwise ``dim`` is water-filled
    over the groups (each layer, then the rest) in proportion to √(E·√size) with calibration ``energies`` (one
    per group: the mean squared norm of its per-sample gradient), else to √size; each layer's share is then
    factored into (k_in, k_out) (the product may fall a little short of the share).

    Why √(E·√size), the geometric mean of two rules: k ∝ E minimises the summed JL variance Σ E²/k if every
    group's error counted alike, but a side whose vectors share a direction (ReLU activations, pixels) errs
    mostly by a per-query scale that leaves rankings alone, which favours the large early layers that k ∝ E
    starves. Mean flattened Spearman to exact at k = 1024 (orthogonal sides, several seeds), rules √size /
    √(E·√size) / E: tests' MLP 0.973/0.972/0.925, tests' CNN 0.993/0.986/0.972, tests' 28k-parameter LM
    0.828/0.873/0.903; benchmark MLP 0.924/0.906/-, benchmark CNN 0.990/0.987/0.966, benchmark 1.9M-parameter LM
    0.372/0.419/0.485. No single rule wins everywhere; this one is the compromise for seeded sides.

    With ``pca`` sides a group's error is the gradient energy outside its top directions, not a random scale, so
    k ∝ E: held-out Spearman at k = 1024 (calibration on other samples), rules √(E·√size) / E / √E: tests' LM
    0.961/0.969/0.961, tests' CNN 0.991/0.990/0.999, tests' MLP 1.000 each, benchmark LM 0.791/0.835/0.811, benchmark
    CNN 0.998/0.994/0.999 (measured once while choosing the rule; issue 5's closing note has them).
    """
    dim = check_positive_int("dim", dim)
    if sides not in SIDES:
        raise ValueError(f"kron sides must be one of {', '.join(SIDES)}, got {sides!r}")
    sizes = [layer.numel for layer in layers] + ([rest_numel] if rest_params else [])
    if not sizes:
        raise ValueError("the kron projection has no parameters to project")
    if dim < len(sizes):
        raise ValueError(
            f"proj_dim={dim} is smaller than the {len(sizes)} parameter groups the kron projection splits it over; "
            f"use proj_dim={len(sizes)} or more, or fewer layers (layers=GLOB)"
        )
    weights = None
    if energies is not None:
        if len(energies) != len(sizes):
            raise ValueError(f"plan_kron got {len(energies)} energies for {len(sizes)} parameter groups")
        energies = [max(0.0, float(energy)) for energy in energies]
        total = sum(energies)
        if total > 0 and sides == "pca":
            weights = [energy / total for energy in energies]
        elif total > 0:
            weights = [math.sqrt(energy / total * math.sqrt(size)) for energy, size in zip(energies, sizes)]
    shares = _water_fill(dim, sizes, weights)
    plans = tuple(
        KronLayerPlan(layer, *_factor(share, layer.in_dim, layer.out_dim, sides), sides=_layer_sides(layer, sides))
        for layer, share in zip(layers, shares)
    )
    rest_dim = min(rest_numel, shares[-1]) if rest_params else 0
    return KronPlan(
        layers=plans, rest_params=tuple(rest_params), rest_numel=rest_numel if rest_params else 0, rest_dim=rest_dim
    )


def _layer_sides(layer: KronLayer, sides: str) -> str:
    """``sides`` for this layer; pca falls back to orthogonal on a layer with a side too wide to decompose."""
    if sides != "pca":
        return sides
    widths = ([] if layer.kind == "embedding" else [layer.in_dim]) + [layer.out_dim]
    return "orthogonal" if max(widths) > PCA_MAX_WIDTH else "pca"


def pca_side_matrix(moment: Tensor, k: int) -> Tensor:
    """The ``[width, k]`` pca side: the top-k eigenvectors (largest first) of a side's second moment ``[width, width]``,
    or, for a diagonal moment given as ``[width]`` (an embedding's token counts), the indicator columns of its k largest
    entries (ties to the lower index). Orthonormal columns, unscaled: the side keeps the k directions that carry the
    most
    of the calibration gradients and drops the rest (a biased, low-variance sketch). Signs fixed (each column's largest
    entry positive) so that the same moment always gives the same matrix."""
    moment = moment.detach().double().cpu()
    width = moment.shape[0]
    if moment.ndim == 1:
        order = torch.argsort(-moment, stable=True)[:k]
        matrix = torch.zeros(width, k, dtype=torch.float64)
        matrix[order, torch.arange(k)] = 1.0
        return matrix.float()
    _, vectors = torch.linalg.eigh((moment + moment.T) / 2)
    vectors = vectors[:, -k:].flip(1)
    peaks = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))
    return (vectors * torch.where(peaks < 0, -1.0, 1.0)).float().contiguous()


def kron_side_matrix(
    seed: int, checkpoint: int, layer: KronLayer, side: str, k: int, sides: str = "gaussian"
) -> Tensor | None:
    """The ``[width, k]`` projection of one side (``side`` is "in" or "out"); None when k is the full width.

    ``gaussian``: N(0, 1/k) entries. ``orthogonal``: the same Gaussian's orthonormalised columns (QR in
    float64, signs fixed by R's diagonal) scaled by √(width/k), so E[P Pᵀ] = I with less variance when k is
    a sizeable fraction of the width. Returned transposed (width first) so that an embedding's input side is
    a row lookup.
    """
    width = layer.in_dim if side == "in" else layer.out_dim
    if k >= width:
        return None
    if sides == "pca":
        raise ValueError(f"the pca sides of {layer.name} come from calibration data (pca_side_matrix), not from a seed")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed("kron", seed, checkpoint, layer.params[0], (layer.out_dim, layer.in_dim), side))
    gaussian = torch.randn(width, k, generator=generator)
    if sides == "gaussian":
        return gaussian.mul_(1.0 / math.sqrt(k))
    q, r = torch.linalg.qr(gaussian.double())
    q *= torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    return q.mul_(math.sqrt(width / k)).float()
