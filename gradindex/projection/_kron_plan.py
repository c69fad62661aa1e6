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
0.981 → 0.994, transformer LM 0.431 → 0.835, measured before the spectral split of ``plan_kron``). With pca, a small
layer (``KronLayerPlan.flat``) and the unfactored parameters (``KronPlan.rest_kind`` ``pca``) are projected flat: on
the top eigenvectors of their whole per-sample gradients' moment (``pca_flat_matrix``, from the calibration vectors
themselves). Because none of these can be re-derived from a seed, a build stores them (``transforms/kron_sides``)
and every later use reads them.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gradindex.projection._sketch import exact_side_eigen, exact_width, sketch_rank, top_eigen, torch_threads
from gradindex.projection._spec import KRON_SIDES, derive_seed
from gradindex.utils import check_positive_int

__all__ = [
    "PCA_MAX_SIDE",
    "PCA_MAX_WIDTH",
    "REST_SIDE",
    "KronLayer",
    "KronLayerPlan",
    "KronPlan",
    "flat_spectrum",
    "kron_side_matrix",
    "mix_spectra",
    "pca_flat_matrix",
    "pca_side_matrix",
    "plan_kron",
]


@dataclass(frozen=True)
class KronLayer:
    """A factorable layer: its gradient is a ``[out_dim, in_dim]`` matrix (the bias, if any, is the last input
    column).

    ``kind`` is ``linear`` (``nn.Linear``), ``hf_conv1d`` (transformers' ``Conv1D``: ``x @ W + b`` with the weight
    stored ``[in, out]``; factored like a Linear), ``conv`` (``nn.Conv1d``/``nn.Conv2d``: patches as inputs),
    ``embedding`` (token indicators as inputs) or ``tied``: one weight used by several modules (GPT-2's token embedding
    that is also its output layer), ``uses`` naming each ``(module, kind)``; its gradient is the sum over the uses,
    with one pair of sides for all of them (an embedding's vocabulary side is a Linear head's output side).
    """

    name: str  # the module's name in the model (a tied weight: its first module)
    kind: str  # "linear", "hf_conv1d", "conv", "embedding" or "tied"
    params: tuple[str, ...]  # the parameter names it covers: weight first, then bias
    in_dim: int
    out_dim: int
    uses: tuple[tuple[str, str], ...] = ()  # a tied weight's (module, kind) uses, in model order

    @property
    def numel(self) -> int:
        return self.in_dim * self.out_dim

    @property
    def indicator_in(self) -> bool:
        """Whether every input vector is a token indicator (an embedding's), so the input side's moment is diagonal."""
        return self.kind == "embedding" or (self.kind == "tied" and all(kind == "embedding" for _, kind in self.uses))


SIDES = tuple(sorted(KRON_SIDES))
# how the unfactored parameters are projected together
_REST_KINDS = ("identity", "sjlt", "pca")
# the key of the unfactored parameters' pca matrix among the side matrices: (layer, side)
REST_SIDE = ("", "rest")
# a flat pca group (a small layer's whole per-sample gradient, the unfactored parameters) has at most this many
# entries: its calibration vectors are kept, [samples, width] float64
PCA_MAX_WIDTH = 4096
# a pca side wider than this draws orthogonal sides instead (its sketch, [width, l] float64, would pass ~100 MiB);
# an embedding's input side has no such limit (its moment is diagonal: token counts). Sides wider than
# SKETCH_MIN_WIDTH are sketched while the calibration streams (SideSketch), never formed as [width, width] moments.
PCA_MAX_SIDE = 1 << 15


@dataclass(frozen=True)
class KronLayerPlan:
    """How one factored group is projected: ``k_in × k_out`` sides, or, for a small layer (``flat`` > 0), its whole
    per-sample gradient (both sides full) projected on the top ``flat`` directions of its calibration gradients."""

    layer: KronLayer
    k_in: int
    k_out: int
    sides: str = "gaussian"  # how a side narrower than its width is drawn: see kron_side_matrix (pca: from calibration)
    flat: int = 0  # > 0: a flat pca of the per-sample gradient to this many dimensions (k_in, k_out full)

    def narrow_sides(self) -> list[tuple[str, int, int]]:
        """``(side, width, k)`` of each side that is projected (k below its width), "in" first."""
        if self.flat:
            return []
        return [
            (side, width, k)
            for side, width, k in (("in", self.layer.in_dim, self.k_in), ("out", self.layer.out_dim, self.k_out))
            if k < width
        ]

    @property
    def dim(self) -> int:
        return self.flat or self.k_in * self.k_out

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
        if self.layer.uses:
            entry["uses"] = [list(use) for use in self.layer.uses]
        if self.sides != "gaussian":
            entry["sides"] = self.sides
        if self.flat:
            entry["flat"] = self.flat
        return entry


@dataclass(frozen=True)
class KronPlan:
    """Where each part of the per-checkpoint vector comes from: factored layers first, then the rest.

    ``rest_dim`` is the width given to the parameters that are not factored, projected together as
    ``rest_kind`` says: ``identity`` (when ``rest_dim`` equals ``rest_numel``), ``sjlt`` over their per-sample
    gradients, or ``pca`` (the top directions of their calibration gradients, like a pca side).
    ``dim`` = Σ k_in·k_out + rest_dim ≤ the asked dim.
    """

    layers: tuple[KronLayerPlan, ...]
    rest_params: tuple[str, ...]
    rest_numel: int
    rest_dim: int
    rest_kind: str = ""  # "" : identity when it fits, else sjlt

    def __post_init__(self) -> None:
        if not self.rest_kind:
            kind = "identity" if self.rest_dim == self.rest_numel else "sjlt"
            object.__setattr__(self, "rest_kind", kind)

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
                "type": self.rest_kind,
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
        found = [
            (layer.name, layer.kind, list(layer.params), layer.in_dim, layer.out_dim, [list(use) for use in layer.uses])
            for layer in layers
        ]
        wanted = [
            (
                entry["module"],
                entry["type"],
                list(entry["params"]),
                entry["in"],
                entry["out"],
                [list(use) for use in entry.get("uses", [])],
            )
            for entry in recorded
        ]
        if found != wanted or [list(rest["params"]) for rest in rests] != ([list(rest_params)] if rest_params else []):
            raise ValueError(
                f"the recorded kron plan does not fit this model: it factors {[entry[0] for entry in wanted]} "
                f"(the model has {[entry[0] for entry in found]}) and projects {[rest['params'] for rest in rests]} "
                "unfactored "
                f"(the model: {list(rest_params)}); use the model (task) and the layers the store was built with (a "
                "store built before this version factored HF Conv1D, shared position embeddings and tied weights "
                "must be rebuilt with overwrite=True)"
            )
        plans = []
        for layer, entry in zip(layers, recorded):
            k_in, k_out, sides = int(entry["k_in"]), int(entry["k_out"]), entry.get("sides", "gaussian")
            flat = int(entry.get("flat", 0))
            if (
                not (1 <= k_in <= layer.in_dim and 1 <= k_out <= layer.out_dim)
                or sides not in SIDES
                or (
                    flat
                    and not (flat < layer.numel and (k_in, k_out) == (layer.in_dim, layer.out_dim) and sides == "pca")
                )
            ):
                raise ValueError(
                    f"the recorded kron plan of {layer.name} is invalid ({entry}): the store's manifest was edited or "
                    "damaged; "
                    "rebuild the store with overwrite=True"
                )
            plans.append(KronLayerPlan(layer, k_in, k_out, sides=sides, flat=flat))
        rest = rests[0] if rests else None
        rest_dim = int(rest["dim"]) if rest else 0
        rest_kind = str(rest.get("type") or ("identity" if rest_dim == rest_numel else "sjlt")) if rest else ""
        if rest and not (
            1 <= rest_dim <= rest_numel
            and rest_kind in _REST_KINDS
            and (rest_kind == "identity") == (rest_dim == rest_numel)
        ):
            raise ValueError(
                f"the recorded kron plan of the unfactored parameters is invalid ({rest}): the store's manifest was "
                "edited or damaged; rebuild the store with overwrite=True"
            )
        return KronPlan(
            layers=tuple(plans),
            rest_params=tuple(rest_params),
            rest_numel=rest_numel if rest_params else 0,
            rest_dim=rest_dim,
            rest_kind=rest_kind,
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
    spectra: Sequence | None = None,
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

    With pca sides and ``spectra`` (each side's eigenvalues on the calibration samples) the split is chosen to keep
    the most gradient energy: a group keeps about ``E · f_in(k_in) · f_out(k_out)`` (``f`` the share of a side's
    eigenvalues in its top k), and k grows one side at a time where it keeps the most energy per added dimension,
    so a layer whose gradients live in few directions on one side gets a narrow k there and a wide k on the other.
    A layer given a ``flat`` spectrum (the eigenvalues of its whole per-sample gradient's moment: the featurizer
    offers one for small layers) is projected flat on its top directions, which no Kronecker product of sides
    reaches; the rest is always flat (``pca``). Groups without a spectrum (a side wider than ``PCA_MAX_SIDE``,
    whose sides are orthogonal) keep their k ∝ E share. Each spectrum has a floor far below its eigenvalues, so a
    budget left once the calibration's directions are all kept still goes to directions it did not see. Mean
    per-query Spearman to exact TracIn at k = 1024 per checkpoint on a tiny tied GPT-2 trained 30 / 120 / 400 steps
    (calibration on 256 of 512 sequences): k ∝ E 0.975 / 0.961 / 0.915, spectra with Kronecker sides only 0.993 /
    0.974 / 0.949, with flat small layers 0.998 / 0.991 / 0.975 (tiny BERT classifier ≥ 0.9997 with each). The tests'
    workloads at k = 1024 on samples the calibration did not see (flat / per query): CNN 0.999 / 0.999, MLP 1.000 /
    1.000, 28k-parameter LM with 30 calibration samples 0.975 / 0.970 (k ∝ E: 0.968 / 0.961).

    Args:
        dim: the width per checkpoint asked for.
        layers: the factored groups, in plan order.
        rest_params: the parameters projected together after the layers (none: no rest group).
        rest_numel: their number of entries.
        energies: one per group (layers, then the rest): its calibration gradient energy.
        sides: how narrow sides are drawn (``gaussian``, ``orthogonal``, ``pca``).
        spectra: pca only, one per group: a layer's ``(in, out)`` eigenvalues, the rest's eigenvalues; any may be
            None (no spectrum). An embedding's input eigenvalues are its per-token energies.

    Returns:
        The plan.

    Raises:
        ValueError: ``dim`` smaller than the number of groups, unknown sides, or energies/spectra that do not match
            the groups.
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
    layer_sides = [_layer_sides(layer, sides) for layer in layers]
    ks = [_factor(share, layer.in_dim, layer.out_dim, sides) for layer, share in zip(layers, shares)]
    rest_dim = min(rest_numel, shares[-1]) if rest_params else 0
    rest_kind = ""
    flats = [0] * len(layers)
    if spectra is not None and sides == "pca" and weights is not None and dim < sum(sizes):
        if len(spectra) != len(sizes):
            raise ValueError(f"plan_kron got {len(spectra)} spectra for {len(sizes)} parameter groups")
        curves = [
            _layer_curves(layer, spectrum) if side == "pca" else None
            for layer, side, spectrum in zip(layers, layer_sides, spectra)
        ]
        if rest_params:
            curve = _curve((spectra[-1] or {}).get("flat"), rest_numel) if rest_numel <= PCA_MAX_WIDTH else None
            curves.append(None if curve is None else (None, curve))
        fixed = sum(share for share, curve in zip(shares, curves) if curve is None)
        spectral = [(group, curve) for group, curve in enumerate(curves) if curve is not None]
        grown = _greedy_split(dim - fixed, [(weights[group], curve) for group, curve in spectral])
        for (group, curve), (k_in, k_out) in zip(spectral, grown):
            if group == len(layers):
                rest_dim, rest_kind = k_out, ("identity" if k_out == rest_numel else "pca")
            elif curve[0] is None:  # a small layer: flat, or whole when its k covers it
                layer = layers[group]
                ks[group] = (layer.in_dim, layer.out_dim)
                flats[group] = k_out if k_out < layer.numel else 0
            else:
                ks[group] = (k_in, k_out)
    plans = tuple(
        KronLayerPlan(layer, *k, sides=side, flat=flat) for layer, k, side, flat in zip(layers, ks, layer_sides, flats)
    )
    return KronPlan(
        layers=plans,
        rest_params=tuple(rest_params),
        rest_numel=rest_numel if rest_params else 0,
        rest_dim=rest_dim,
        rest_kind=rest_kind,
    )


def _layer_curves(layer: KronLayer, spectrum: dict | None) -> tuple | None:
    """A layer's ``(f_in, f_out)`` for the greedy split: its sides' curves, or ``(None, f)`` for a small layer given a
    ``flat`` spectrum (one vector of ``numel`` entries); None without a spectrum."""
    if not spectrum:
        return None
    if "flat" in spectrum:
        curve = _curve(spectrum["flat"], layer.numel)
        return None if curve is None else (None, curve)
    f_in, f_out = _curve(spectrum.get("in"), layer.in_dim), _curve(spectrum.get("out"), layer.out_dim)
    return None if f_in is None or f_out is None else (f_in, f_out)


def _curve(eigenvalues: Sequence[float] | None, width: int) -> list[float] | None:
    """``f(k)`` for k = 0..width: the share of a side's energy in its top k eigenvalues (None: no spectrum)."""
    if eigenvalues is None:
        return None
    values = sorted((max(0.0, float(value)) for value in eigenvalues), reverse=True)[:width]
    values += [0.0] * (width - len(values))
    total = sum(values)
    if total <= 0:
        return [k / width for k in range(width + 1)]
    # a floor far below any real eigenvalue: once the calibration's directions are all kept, what is left of the
    # budget still goes to the directions it did not see (held-out samples have gradient there), widest first
    values = [value + 1e-9 * total / width for value in values]
    total = sum(values)
    curve, running = [0.0], 0.0
    for value in values:
        running += value
        curve.append(min(1.0, running / total))
    return curve


def _greedy_split(budget: int, groups: Sequence[tuple[float, tuple]]) -> list[tuple[int, int]]:
    """``(k_in, k_out)`` per group (weight E, (f_in, f_out) curves; f_in None: a flat vector, k_in stays 1) that
    keeps the most of Σ E · f_in(k_in) · f_out(k_out) within Σ k_in·k_out ≤ budget: every group starts at 1 × 1, then
    one side at a time grows where it keeps the most per added dimension (ties to the earlier group, the input
    side). Deterministic."""
    ks = [[1, 1] for _ in groups]
    left = budget - len(groups)

    def kept(group: int, k_in: int, k_out: int) -> float:
        weight, (f_in, f_out) = groups[group]
        return weight * (1.0 if f_in is None else f_in[k_in]) * f_out[k_out]

    def moves(group: int) -> list[tuple[float, int, int, int, int]]:
        """(-gain per dimension, group, side, cost, version) of each way this group can grow."""
        (_, (f_in, f_out)), (k_in, k_out) = groups[group], ks[group]
        now = kept(group, k_in, k_out)
        found = []
        if f_in is not None and k_in < len(f_in) - 1:
            found.append((-(kept(group, k_in + 1, k_out) - now) / k_out, group, 0, k_out, versions[group]))
        if k_out < len(f_out) - 1:
            found.append((-(kept(group, k_in, k_out + 1) - now) / k_in, group, 1, k_in, versions[group]))
        return found

    versions = [0] * len(groups)
    heap = [move for group in range(len(groups)) for move in moves(group)]
    heapq.heapify(heap)
    while heap and left > 0:
        gain, group, side, cost, version = heapq.heappop(heap)
        if version != versions[group] or cost > left:
            continue  # stale, or too wide now (costs only grow)
        if gain >= 0:
            break  # nothing left to keep
        ks[group][side] += 1
        left -= cost
        versions[group] += 1
        for move in moves(group):
            heapq.heappush(heap, move)
    return [(k_in, k_out) for k_in, k_out in ks]


def mix_spectra(spectra: Sequence[Sequence[float] | None], weights: Sequence[float]) -> list[float] | None:
    """One side's spectrum over several checkpoints: the weighted mean of each checkpoint's share curve (its top-k
    eigenvalue share), given back as eigenvalues (the curve's steps, non-increasing). None when no checkpoint has one.

    Args:
        spectra: each checkpoint's eigenvalues of the side (None: none).
        weights: each checkpoint's weight (its share of the group's gradient energy).
    """
    pairs = [(spectrum, max(0.0, float(weight))) for spectrum, weight in zip(spectra, weights) if spectrum is not None]
    if not pairs:
        return None
    width = max(len(spectrum) for spectrum, _ in pairs)
    if sum(weight for _, weight in pairs) <= 0:
        pairs = [(spectrum, 1.0) for spectrum, _ in pairs]
    total = sum(weight for _, weight in pairs)
    mixed = [0.0] * (width + 1)
    for spectrum, weight in pairs:
        for k, value in enumerate(_curve(spectrum, width)):
            mixed[k] += weight * value / total
    return [mixed[k + 1] - mixed[k] for k in range(width)]


def _layer_sides(layer: KronLayer, sides: str) -> str:
    """``sides`` for this layer; pca falls back to orthogonal on a layer with a side too wide to decompose."""
    if sides != "pca":
        return sides
    widths = ([] if layer.indicator_in else [layer.in_dim]) + [layer.out_dim]
    return "orthogonal" if max(widths) > PCA_MAX_SIDE else "pca"


def pca_side_matrix(moment: Tensor, k: int) -> Tensor:
    """The ``[width, k]`` pca side: the top-k eigenvectors (largest first) of a side's second moment ``[width, width]``,
    or, for a diagonal moment given as ``[width]`` (an embedding's token counts), the indicator columns of its k largest
    entries (ties to the lower index). Orthonormal columns, unscaled: the side keeps the k directions that carry the
    most of the calibration gradients and drops the rest (a biased, low-variance sketch). Signs fixed (each column's
    largest entry positive) so that the same moment always gives the same matrix.

    A narrow moment (or a k near its width) is decomposed exactly (``eigh`` under one thread); a wide one by seeded
    randomized subspace iteration (``top_eigen``, cost ``O(width²·k)``). A build never forms wide moments at all: it
    sketches them while streaming the calibration samples (``SideSketch``)."""
    moment = moment.detach().double().cpu()
    width = moment.shape[0]
    if moment.ndim == 1:
        order = torch.argsort(-moment, stable=True)[:k]
        matrix = torch.zeros(width, k, dtype=torch.float64)
        matrix[order, torch.arange(k)] = 1.0
        return matrix.float()
    rank = sketch_rank(width, 0, k)
    if exact_width(width, rank):
        return exact_side_eigen(moment).matrix(k)
    return top_eigen(moment, k, derive_seed("pca-side", width, k)).matrix(k)


def _gram(rows: Tensor) -> tuple[Tensor, bool]:
    """The smaller of ``rows rowsᵀ`` and ``rowsᵀ rows`` (same non-zero eigenvalues), and whether it is the first."""
    rows = rows.detach().double().cpu()
    small = rows.shape[0] < rows.shape[1]
    return (rows @ rows.T if small else rows.T @ rows), small


def flat_spectrum(rows: Tensor) -> Tensor:
    """The eigenvalues (largest first) of ``rowsᵀ rows``, the second moment of a flat group's calibration vectors
    ``rows [n, width]``, through the smaller Gram matrix (the moment has rank at most n: no ``[width, width]``
    eigensolve for a wide group)."""
    gram, _ = _gram(rows)
    with torch_threads(1):
        return torch.linalg.eigvalsh((gram + gram.T) / 2).flip(0).clamp(min=0)


def pca_flat_matrix(rows: Tensor, k: int) -> Tensor:
    """The ``[width, k]`` pca matrix of a flat group (a small layer's whole per-sample gradient, or the unfactored
    parameters): the top-k eigenvectors of its calibration vectors' second moment ``rowsᵀ rows`` (``rows [n, width]``;
    through the ``[n, n]`` Gram matrix when n < width), with signs fixed like ``pca_side_matrix``. Past the vectors'
    rank (k > n, or vectors that span less) the matrix is completed with the unit vectors farthest from their span
    (``_completed``): directions the calibration did not see, which held-out samples' gradients may have."""
    rows = rows.detach().double().cpu()
    gram, small = _gram(rows)
    with torch_threads(1):
        values, vectors = torch.linalg.eigh((gram + gram.T) / 2)
    values, vectors = values.flip(0), vectors.flip(1)
    rank = int((values > values[0] * 1e-10).sum()) if values.numel() and values[0] > 0 else 0
    keep = min(k, rank)
    # from the [n, n] Gram matrix, the right singular vectors come from the left ones: v = rowsᵀ u / σ
    basis = rows.T @ vectors[:, :keep] / values[:keep].sqrt() if small else vectors[:, :keep]
    if basis.shape[1]:
        peaks = basis.gather(0, basis.abs().argmax(0, keepdim=True))
        basis = basis * torch.where(peaks < 0, -1.0, 1.0)
    if basis.shape[1] < k:
        basis = _completed(basis, k)
    return basis.float().contiguous()


def _completed(basis: Tensor, k: int) -> Tensor:
    """``basis`` (orthonormal float64 columns ``[width, m]``) with ``k - m`` (≤ ``width - m``) columns more: the unit
    vectors farthest from its span, in that order (ties by index), each made orthogonal to every column before it and
    kept unless less than half of it is left (then, if that leaves too few, less than 1e-6): Gram-Schmidt one vector
    at a time, done a block at a time by Householder QR up to the first vector left out."""
    width = basis.shape[0]
    order = torch.argsort(-(1.0 - basis.square().sum(1)), stable=True)  # each unit vector's squared distance
    for least in (0.5, 1e-6):
        start = 0
        while basis.shape[1] < k and start < width:
            need = k - basis.shape[1]
            candidates = order[start : start + need + max(8, need // 8)]
            block = torch.zeros(width, len(candidates), dtype=torch.float64)
            block[candidates, torch.arange(len(candidates))] = 1.0
            for _ in range(2):  # twice: orthogonal to the span to working precision
                block -= basis @ (basis.T @ block)
            with torch_threads(1):
                q, r = torch.linalg.qr(block)
            left = torch.diagonal(r)
            short = (left.abs() <= least).nonzero().reshape(-1)
            run = int(short[0]) if len(short) else len(candidates)  # the columns before the first one left out
            take = min(run, need)
            basis = torch.cat([basis, q[:, :take] * torch.where(left[:take] < 0, -1.0, 1.0)], dim=1)
            start += take + (1 if take == run < len(candidates) else 0)
    return basis


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
    with torch_threads(1):
        q, r = torch.linalg.qr(gaussian.double())
    q *= torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    return q.mul_(math.sqrt(width / k)).float()
