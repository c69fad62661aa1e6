"""K-FAC / EK-FAC preconditioning of TracIn's projected gradients (``tracin`` with ``precondition=kfac|ekfac``).

For checkpoint c with the rows it stores, v_n (the projected loss gradients TracIn stores: √η_c P_c∇ℓ(z_n; θ_c),
unit-normalised first with ``normalize``), the curvature is the empirical Fisher in the projected space,
H_c = (1/N) Σ_n v_n v_nᵀ, approximated block-diagonally over the groups of the per-checkpoint vector:

* a factored group of the ``kron`` projection (its part of v is a k_out × k_in block B_n, row-major): Kronecker
  factors from the blocks themselves, S_in = (1/N) Σ_n B_nᵀB_n and S_out = (1/N) Σ_n B_nB_nᵀ, with eigenbases
  U_in and U_out. For one position per sample (B_n = g̃ ãᵀ) they are K-FAC's activation and output-gradient
  covariances, each weighted by the other side's squared norm (so their eigenbases are those of the gradient's
  own energy, as the kron plan's pca sides are).
  ``kfac``: H ≈ (S_out ⊗ S_in) / e with e = (1/N) Σ_n |B_n|² (the trace of H exactly), eigenvalues σ_out,i σ_in,j / e.
  ``ekfac`` (George et al. 2018): the same eigenbasis with the eigenvalues refit to the data,
  Λ_ij = (1/N) Σ_n (U_outᵀ B_n U_in)_ij², the diagonal of H in that basis.
  A side wider than ``DENSE_MAX`` keeps the identity as its basis (its factor's diagonal only).
* any other group (a small layer projected flat, the unfactored parameters, or the whole block of a non-kron
  projection): its block of H itself, eigendecomposed, when it has at most ``DENSE_MAX`` entries; a wider one its
  diagonal (the identity basis with Λ = (1/N) Σ_n v_n²).

Damping is relative, per group and checkpoint as kronfluence's default: λ_g = ``damping`` · mean(Λ_g). The score of
training row z for query q is Σ_c η_c v_c(q)ᵀ (H_c + λ)^{-1} v_c(z), the influence of z on q at each checkpoint
weighted by its learning rate η_c: stored rows stay TracIn's, and the query vector is
[η_c (H_rows,c + λ)^{-1} v_c(q)]_c with H_rows,c = η_c H_c the curvature of the rows as stored. The factors are
computed from the stored rows when the last shard is done (``transforms/precondition``, ``pack``) and inverted at
query time at the damping asked for: one index, many λ. Self-influence Σ_c η_c v_cᵀ(H_c + λ)^{-1}v_c is written
then too (``transforms/self_influence``).

``precondition_side=both`` puts the symmetric half on every vector instead: φ_c = √η_c (H_rows,c + λ)^{-1/2} v_c, so
FAISS inner products and ⟨φ, φ⟩ are the same influence with no query-side transform, and ``normalize`` then makes
them cosines of preconditioned gradients (TrackStar's unit normalisation after its curvature correction, Chang et
al. 2024). Its factors must exist before the first row: they are fit to ``factor_samples`` evenly spaced training
samples when the build starts, and its damping is fixed at build.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from gradindex.errors import ArgumentError, CorruptStoreError, IncompatibleStoreError, IncompleteStoreError
from gradindex.methods._base import MethodFeaturizer

if TYPE_CHECKING:
    from gradindex.store import GradientStore

__all__ = [
    "DENSE_MAX",
    "PRECONDITION_TRANSFORM",
    "PreconditionGroup",
    "Preconditioned",
    "Preconditioner",
    "finish_precondition",
    "precondition_groups",
    "precondition_self_influence",
]

# the store transform holding every checkpoint's factors, packed flat (``Preconditioner.pack``)
PRECONDITION_TRANSFORM = "precondition"
# a side or flat group wider than this keeps the identity basis (its diagonal): eigh of a [k, k] float64 is cheap up
# to here (4096²·8 = 128 MiB)
DENSE_MAX = 4096


@dataclass(frozen=True)
class PreconditionGroup:
    """One block of the per-checkpoint vector: ``kron`` (a k_out × k_in block, row-major), ``dense`` (its own block
    of H) or ``diagonal``; ``offset`` and ``dim`` locate it in the checkpoint's block of the row."""

    kind: str
    offset: int
    dim: int
    k_out: int = 0
    k_in: int = 0
    dense_max: int = DENSE_MAX  # a kron side wider than this keeps the identity basis

    def side_dense(self, side: str) -> bool:
        """Whether a kron side gets an eigenbasis (else the identity: its factor's diagonal)."""
        return (self.k_out if side == "out" else self.k_in) <= self.dense_max


def precondition_groups(fingerprint: Mapping[str, Any]) -> list[PreconditionGroup]:
    """The groups of one checkpoint's block, from a store's (or featurizer's) fingerprint.

    A ``kron`` projection's recorded plan gives its layers (factored, or flat) and the unfactored parameters, in
    the order the vector lays them out; any other projection is one flat group of ``block_dim``.

    Raises:
        CorruptStoreError: the recorded plan does not add up to the block width.
    """
    projection = fingerprint.get("projection") or {}
    block_dim = int(fingerprint["block_dim"])
    plan = projection.get("plan") if projection.get("kind") == "kron" else None
    if not plan:
        return [_flat(0, block_dim)]
    groups, offset = [], 0
    for entry in plan:
        if "module" in entry:
            if entry.get("flat"):
                dim = int(entry["flat"])
                groups.append(_flat(offset, dim))
            else:
                k_out, k_in = int(entry["k_out"]), int(entry["k_in"])
                dim = k_out * k_in
                groups.append(PreconditionGroup("kron", offset, dim, k_out=k_out, k_in=k_in))
        elif "params" in entry:
            dim = int(entry["dim"])
            groups.append(_flat(offset, dim))
        else:
            continue
        offset += dim
    if offset != block_dim:
        raise CorruptStoreError(
            f"the recorded kron plan lays out {offset} entries per checkpoint but the vectors have {block_dim}; "
            "rebuild the store with overwrite=True"
        )
    return groups


def _flat(offset: int, dim: int) -> PreconditionGroup:
    return PreconditionGroup("dense" if dim <= DENSE_MAX else "diagonal", offset, dim)


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``(values [..., k] ≥ 0, vectors [..., k, k])`` of symmetric PSD matrices (rounding negatives clipped)."""
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.transpose(-1, -2)))
    return values.clamp_min(0.0), vectors


def _moment_sums(
    rows: Callable[[], Iterable[np.ndarray | Tensor]],
    groups: Sequence[PreconditionGroup],
    n_checkpoints: int,
    block_dim: int,
) -> tuple[list[list[Tensor]], int]:
    """Per group the sums over rows that its factors are made of (kron: the output and input side moments and the
    energy; dense: Σ v vᵀ; diagonal: Σ v²), and the number of rows."""
    sums: list[list[Tensor]] = []
    for group in groups:
        if group.kind == "kron":
            out = (n_checkpoints, group.k_out, group.k_out) if group.side_dense("out") else (n_checkpoints, group.k_out)
            inn = (n_checkpoints, group.k_in, group.k_in) if group.side_dense("in") else (n_checkpoints, group.k_in)
            shapes = [out, inn, (n_checkpoints,)]
        elif group.kind == "dense":
            shapes = [(n_checkpoints, group.dim, group.dim)]
        else:
            shapes = [(n_checkpoints, group.dim)]
        sums.append([torch.zeros(shape, dtype=torch.float64) for shape in shapes])
    n_rows = 0
    for block in rows():
        x = _as_blocks(block, n_checkpoints, block_dim)
        n_rows += x.shape[0]
        for group, found in zip(groups, sums):
            part = x[:, :, group.offset : group.offset + group.dim]
            if group.kind == "kron":
                b = part.reshape(*part.shape[:2], group.k_out, group.k_in)
                found[0] += torch.einsum("ncoi,ncpi->cop", b, b) if group.side_dense("out") else b.square().sum((0, 3))
                found[1] += torch.einsum("ncoi,ncoj->cij", b, b) if group.side_dense("in") else b.square().sum((0, 2))
                found[2] += b.square().sum((0, 2, 3))
            elif group.kind == "dense":
                found[0] += torch.einsum("nci,ncj->cij", part, part)
            else:
                found[0] += part.square().sum(0)
    return sums, n_rows


class Preconditioner:
    """Every checkpoint's factors: per group a basis (``U_out``/``U_in``, ``U`` or none) and eigenvalues ``Λ``.

    ``bases[g]`` is a tuple of ``[C, k, k]`` float64 tensors (None for an identity side), ``values[g]`` the
    ``[C, ...]`` eigenvalues (kron: ``[C, k_out, k_in]``; others ``[C, dim]``); ``weights`` the η_c.
    """

    def __init__(
        self,
        groups: Sequence[PreconditionGroup],
        bases: Sequence[tuple[Tensor | None, ...]],
        values: Sequence[Tensor],
        weights: Sequence[float],
    ):
        self.groups = list(groups)
        self.bases = list(bases)
        self.values = list(values)
        self.weights = torch.tensor([float(weight) for weight in weights], dtype=torch.float64)
        self.n_checkpoints = len(self.weights)
        self.block_dim = sum(group.dim for group in self.groups)

    # ---- fitting ---------------------------------------------------------------------------------
    @staticmethod
    def fit(
        rows: Callable[[], Iterable[np.ndarray | Tensor]],
        groups: Sequence[PreconditionGroup],
        weights: Sequence[float],
        kind: str = "ekfac",
        *,
        mix_rows: Callable[[], Iterable[np.ndarray | Tensor]] | None = None,
        mix: float = 0.0,
    ) -> Preconditioner:
        """Fit the factors to stored rows.

        Args:
            rows: gives a fresh iterator over the rows in blocks (``[b, C·block_dim]``; called twice for ekfac).
            groups: the layout of each checkpoint's block (``precondition_groups``).
            weights: η_c of each checkpoint.
            kind: ``kfac`` or ``ekfac``.
            mix_rows: rows of the queries' gradients (the same layout), for TrackStar's mixing.
            mix: λ: every moment the factors are made of is (1 − λ)·(that of ``rows``) + λ·(that of ``mix_rows``),
                so a dense group's H is exactly λ·H_query + (1 − λ)·H_train; a kron group mixes its two side factors
                (and ekfac its refit eigenvalues, the diagonal of the mixed H in the mixed basis).

        Returns:
            The preconditioner.

        Raises:
            ValueError: no rows, or rows of another width.
        """
        if kind not in ("kfac", "ekfac"):
            raise ValueError(f"precondition must be kfac or ekfac to fit factors, got {kind!r}")
        n_checkpoints, block_dim = len(weights), sum(group.dim for group in groups)
        sources = [(rows, 1.0 - mix)] + ([(mix_rows, mix)] if mix_rows is not None and mix > 0 else [])
        sources = [(source, share) for source, share in sources if share > 0]
        sums = None
        for source, share in sources:
            found, n_rows = _moment_sums(source, groups, n_checkpoints, block_dim)
            if n_rows == 0:
                raise ValueError(
                    "preconditioning needs at least one " + ("training" if source is rows else "query") + " row"
                )
            scaled = [[value * (share / n_rows) for value in group] for group in found]
            sums = scaled if sums is None else [[a + b for a, b in zip(x, y)] for x, y in zip(sums, scaled)]
        bases: list[tuple[Tensor | None, ...]] = []
        values: list[Tensor] = []
        for group, found in zip(groups, sums):
            if group.kind == "kron":
                (out_values, out_basis), (in_values, in_basis) = (
                    _eigh(moment) if moment.ndim == 3 else (moment.clamp_min(0.0), None) for moment in found[:2]
                )
                energy = found[2]
                kron = out_values[:, :, None] * in_values[:, None, :]
                kron = torch.where(energy[:, None, None] > 0, kron / energy.clamp_min(1e-300)[:, None, None], 0.0)
                bases.append((out_basis, in_basis))
                values.append(kron)
            elif group.kind == "dense":
                dense_values, basis = _eigh(found[0])
                bases.append((basis,))
                values.append(dense_values)
            else:
                bases.append(())
                values.append(found[0])
        preconditioner = Preconditioner(groups, bases, values, weights)
        if kind == "ekfac" and any(group.kind == "kron" for group in groups):
            corrected = [torch.zeros_like(value) for value in values]
            for source, share in sources:
                part = [torch.zeros_like(value) for value in values]
                n_rows = 0
                for block in source():
                    x = _as_blocks(block, n_checkpoints, block_dim)
                    n_rows += x.shape[0]
                    for position, group in enumerate(groups):
                        if group.kind == "kron":
                            part[position] += preconditioner._coordinates(position, x).square().sum(0)
                for position in range(len(groups)):
                    corrected[position] += part[position] * (share / n_rows)
            for position, group in enumerate(groups):
                if group.kind == "kron":
                    preconditioner.values[position] = corrected[position]
        return preconditioner

    # ---- applying --------------------------------------------------------------------------------
    def _coordinates(self, position: int, x: Tensor) -> Tensor:
        """Group ``position``'s part of ``x`` ``[n, C, block_dim]`` in its eigenbasis (kron: ``[n, C, k_out, k_in]``,
        else ``[n, C, dim]``)."""
        group = self.groups[position]
        part = x[:, :, group.offset : group.offset + group.dim]
        bases = self.bases[position]
        if group.kind == "kron":
            b = part.reshape(*part.shape[:2], group.k_out, group.k_in)
            out_basis, in_basis = bases
            if out_basis is not None:
                b = torch.einsum("cpo,ncpi->ncoi", out_basis, b)
            if in_basis is not None:
                b = torch.einsum("ncoj,cji->ncoi", b, in_basis)
            return b
        if group.kind == "dense":
            return torch.einsum("cji,ncj->nci", bases[0], part)
        return part

    def _back(self, position: int, coordinates: Tensor) -> Tensor:
        """Coordinates in group ``position``'s eigenbasis back to the vector's own, flattened ``[n, C, dim]``."""
        group = self.groups[position]
        bases = self.bases[position]
        if group.kind == "kron":
            b = coordinates
            out_basis, in_basis = bases
            if out_basis is not None:
                b = torch.einsum("cpo,ncoi->ncpi", out_basis, b)
            if in_basis is not None:
                b = torch.einsum("ncoi,cji->ncoj", b, in_basis)
            return b.reshape(*b.shape[:2], group.dim)
        if group.kind == "dense":
            return torch.einsum("cji,nci->ncj", bases[0], coordinates)
        return coordinates

    def scales(self, damping: float) -> list[Tensor]:
        """Per group the ``[C, ...]`` diagonal of η_c (Λ + λ_g)^{-1} in its eigenbasis, λ_g = damping · mean(Λ_g) (a
        group whose Λ is all zero, such as a checkpoint of weight 0 or a module that never ran, contributes
        nothing).

        Raises:
            ArgumentError: ``damping`` is 0 and some Λ is (numerically) zero, so H is singular.
        """
        found = []
        for group, values in zip(self.groups, self.values):
            flat = values.reshape(self.n_checkpoints, -1)
            mean = flat.mean(1)
            shifted = flat + damping * mean[:, None]
            live = mean > 0
            floor = 1e-12 * flat.abs().amax(1, keepdim=True).clamp_min(1e-300)
            if bool((live[:, None] & (shifted <= floor)).any()):
                raise ArgumentError(
                    "damping",
                    f"the {group.kind} curvature block at offset {group.offset} is singular at damping={damping:g}: "
                    "query with a positive damping (e.g. damping=0.1, relative to each block's mean eigenvalue)",
                )
            scale = torch.where(live[:, None], self.weights[:, None] / torch.where(live[:, None], shifted, 1.0), 0.0)
            found.append(scale.reshape(values.shape))
        return found

    def inverse(self, vectors: Tensor, damping: float, power: float = 1.0) -> Tensor:
        """``[B, C·block_dim]`` rows as stored -> ``[B, C·block_dim]`` float64 query vectors
        [η_c (H_rows,c + λ)^{-1} v_c]_c; with ``power`` 0.5 the symmetric half, [√η_c (H_rows,c + λ)^{-1/2} v_c]_c."""
        x = _as_blocks(vectors, self.n_checkpoints, self.block_dim)
        out = torch.empty_like(x)
        for position, (group, scale) in enumerate(zip(self.groups, self.scales(damping))):
            scaled = self._coordinates(position, x) * (scale if power == 1.0 else scale.pow(power))
            out[:, :, group.offset : group.offset + group.dim] = self._back(position, scaled)
        return out.reshape(len(x), -1)

    def quadratic(self, vectors: Tensor, damping: float, scales: list[Tensor] | None = None) -> Tensor:
        """``[B]`` float64: Σ_c η_c v_cᵀ(H_rows,c + λ)^{-1} v_c of rows as stored (their self-influence)."""
        x = _as_blocks(vectors, self.n_checkpoints, self.block_dim)
        scales = self.scales(damping) if scales is None else scales
        total = torch.zeros(len(x), dtype=torch.float64)
        for position, scale in enumerate(scales):
            total += (self._coordinates(position, x).square() * scale).flatten(1).sum(1)
        return total

    def dense(self, damping: float | None = None) -> list[Tensor]:
        """Each checkpoint's ``[block_dim, block_dim]`` H_rows,c (``damping`` None) or η_c (H_rows,c + λ)^{-1}, formed
        densely from the factors: for tests and small models."""
        found = []
        scales = None if damping is None else self.scales(damping)
        for c in range(self.n_checkpoints):
            matrix = torch.zeros(self.block_dim, self.block_dim, dtype=torch.float64)
            for position, group in enumerate(self.groups):
                span = slice(group.offset, group.offset + group.dim)
                diagonal = (self.values[position] if scales is None else scales[position])[c].reshape(-1)
                eye = torch.eye(group.dim, dtype=torch.float64)[:, None, :]
                basis = self._back(position, _unflatten(group, eye, self.n_checkpoints))[:, c, :]  # [dim, dim]: U
                matrix[span, span] = basis.T @ torch.diag(diagonal) @ basis
            found.append(matrix)
        return found

    # ---- storing ---------------------------------------------------------------------------------
    def pack(self) -> np.ndarray:
        """Every factor, flat float64, in the order ``unpack`` reads: per group, its bases then its eigenvalues
        (all checkpoints of each)."""
        parts = []
        for bases, values in zip(self.bases, self.values):
            parts += [basis.reshape(-1) for basis in bases if basis is not None] + [values.reshape(-1)]
        return torch.cat(parts).numpy() if parts else np.zeros(0)

    @staticmethod
    def unpack(packed: np.ndarray, groups: Sequence[PreconditionGroup], weights: Sequence[float]) -> Preconditioner:
        """The preconditioner ``pack`` wrote, for ``groups`` and ``weights``.

        Raises:
            ValueError: ``packed`` does not have the size the groups need.
        """
        n_checkpoints = len(weights)
        shapes: list[list[tuple[int, ...] | None]] = []
        for group in groups:
            if group.kind == "kron":
                shapes.append(
                    [
                        (n_checkpoints, group.k_out, group.k_out) if group.side_dense("out") else None,
                        (n_checkpoints, group.k_in, group.k_in) if group.side_dense("in") else None,
                        (n_checkpoints, group.k_out, group.k_in),
                    ]
                )
            elif group.kind == "dense":
                shapes.append([(n_checkpoints, group.dim, group.dim), (n_checkpoints, group.dim)])
            else:
                shapes.append([(n_checkpoints, group.dim)])
        expected = sum(int(np.prod(shape)) for found in shapes for shape in found if shape is not None)
        packed = np.asarray(packed)
        if packed.dtype != np.float64 or packed.shape != (expected,):
            raise ValueError(f"the packed factors are {packed.dtype} {list(packed.shape)}, not float64 [{expected}]")
        tensor = torch.from_numpy(packed.copy())
        offset = 0
        bases, values = [], []
        for group, found in zip(groups, shapes):
            parts: list[Tensor | None] = []
            for shape in found:
                if shape is None:
                    parts.append(None)
                    continue
                size = int(np.prod(shape))
                parts.append(tensor[offset : offset + size].reshape(shape))
                offset += size
            if group.kind == "diagonal":
                bases.append(())
            else:
                bases.append(tuple(parts[:-1]))
            values.append(parts[-1])
        return Preconditioner(groups, bases, values, weights)


def _as_blocks(block: np.ndarray | Tensor, n_checkpoints: int, block_dim: int) -> Tensor:
    x = torch.as_tensor(np.asarray(block) if not isinstance(block, Tensor) else block).to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[1] != n_checkpoints * block_dim:
        raise ValueError(f"rows of width {n_checkpoints * block_dim} expected, got shape {list(x.shape)}")
    return x.reshape(len(x), n_checkpoints, block_dim)


def _unflatten(group: PreconditionGroup, x: Tensor, n_checkpoints: int) -> Tensor:
    """``[n, 1, dim]`` vectors repeated over the checkpoints, in a group's coordinate shape."""
    x = x.expand(x.shape[0], n_checkpoints, group.dim)
    return x.reshape(x.shape[0], n_checkpoints, group.k_out, group.k_in) if group.kind == "kron" else x


# ---- the store side ------------------------------------------------------------------------------


def _store_rows(store: GradientStore) -> Callable[[], Iterable[np.ndarray]]:
    def rows() -> Iterable[np.ndarray]:
        for _, block in store.iter_blocks(allow_incomplete=True):
            yield np.asarray(block)

    return rows


def _store_weights(store: GradientStore) -> list[float]:
    return [float(item["weight"]) for item in store.fingerprint["checkpoints"]]


def stored_preconditioner(store: GradientStore, allow_incomplete: bool = False) -> Preconditioner:
    """The factors a store keeps in ``transforms/precondition`` (a store being built holds them when they were fit
    before its rows: ``allow_incomplete``).

    Raises:
        IncompleteStoreError: the store's build has not finished (its factors come from every row).
        CorruptStoreError: the transform is missing or does not fit the store's plan.
    """
    if PRECONDITION_TRANSFORM not in store.transforms():
        if not store.complete and not allow_incomplete:
            raise IncompleteStoreError(
                f"preconditioned queries need store {store.path}'s factors, written when its build completes; "
                "finish it with resume=True"
            )
        raise CorruptStoreError(
            f"store {store.path} was built with precondition but holds no transforms/{PRECONDITION_TRANSFORM}; "
            "rebuild it with overwrite=True"
        )
    groups = precondition_groups(store.fingerprint)
    try:
        return Preconditioner.unpack(store.read_transform(PRECONDITION_TRANSFORM), groups, _store_weights(store))
    except ValueError as error:
        raise CorruptStoreError(
            f"store {store.path}'s transforms/{PRECONDITION_TRANSFORM} does not fit its plan ({error}); rebuild it "
            "with overwrite=True"
        ) from None


def precondition_self_influence(
    store: GradientStore, damping: float, preconditioner: Preconditioner | None = None
) -> np.ndarray:
    """``(N,)`` float32: Σ_c η_c v_c(z)ᵀ(H_c + λ)^{-1}v_c(z) for every row, from the stored rows and factors."""
    preconditioner = stored_preconditioner(store) if preconditioner is None else preconditioner
    scales = preconditioner.scales(damping)
    scores = np.zeros(store.n_samples, dtype=np.float64)
    for first_row, block in store.iter_blocks(allow_incomplete=True):
        scores[first_row : first_row + len(block)] = preconditioner.quadratic(
            torch.from_numpy(np.asarray(block, dtype=np.float64)), damping, scales
        ).numpy()
    return scores.astype(np.float32)


def finish_precondition(
    store: GradientStore,
    kind: str,
    damping: float,
    mix_rows: Callable[[], Iterable[np.ndarray | Tensor]] | None = None,
    mix: float = 0.0,
) -> None:
    """Every shard is written: fit the factors to the stored rows (mixed with ``mix_rows`` by ``mix``, see
    ``Preconditioner.fit``), write them and the self-influence at ``damping``."""
    preconditioner = Preconditioner.fit(
        _store_rows(store),
        precondition_groups(store.fingerprint),
        _store_weights(store),
        kind,
        mix_rows=mix_rows,
        mix=mix,
    )
    scores = precondition_self_influence(store, damping, preconditioner)
    store.write_transform(PRECONDITION_TRANSFORM, preconditioner.pack())
    store.write_transform("self_influence", scores)


class Preconditioned(MethodFeaturizer):
    """TracIn with ``precondition`` (see the module docstring).

    ``precondition_side=query``: stored rows are TracIn's (``inner``), query vectors [η_c (H_rows,c + λ)^{-1} v_c(q)]_c,
    the factors fit to every stored row when the last shard is done. ``both``: every vector (stored and query) is
    [√η_c (H_rows,c + λ)^{-1/2} v_c]_c, unit-normalised per checkpoint block with ``normalize`` (TrackStar's cosine);
    the factors are fit before the build to ``factor_samples`` evenly spaced training samples, written to the store by
    the first worker and read back by every process, and the damping is fixed at build.
    """

    def __init__(self, inner: Any, options: Mapping[str, Any]):
        """``inner``: the ``TracInFeaturizer`` whose vectors are preconditioned; ``options``: tracin's resolved
        options."""
        self.inner = inner
        self.method = "tracin"
        self.options = dict(options)
        self.query_settings = dict(options)
        self.dim = inner.dim
        self.symmetric = options["precondition_side"] == "both"
        self.normalize = bool(inner.normalize)
        if self.symmetric:  # normalised after preconditioning, not before
            inner.normalize = False
        self.preconditioner: Preconditioner | None = None

    def fingerprint(self) -> dict:
        found = self.inner.fingerprint()
        found["method"] = {
            **found["method"],
            "normalize": self.normalize,
            **{name: self.options[name] for name in ("precondition", "damping", "precondition_side", "factor_samples")},
        }
        if self.options["precondition_mix"]:  # (left out at 0: stores built before the option keep their fingerprint)
            found["method"]["precondition_mix"] = self.options["precondition_mix"]
        return found

    def featurize(self, batch: Any) -> Tensor:
        vectors = self.inner.featurize(batch)
        if not self.symmetric:
            return vectors
        if self.preconditioner is None:
            raise IncompleteStoreError(
                "precondition_side=both needs the factors fit at the start of the build; attach the featurizer to its "
                "store first"
            )
        half = self.preconditioner.inverse(vectors, self.options["damping"], power=0.5)
        if self.normalize:
            blocks = half.reshape(len(half), self.preconditioner.n_checkpoints, -1)
            scales = self.preconditioner.weights.sqrt()[None, :, None]
            half = (torch.nn.functional.normalize(blocks, dim=2) * scales).reshape(len(half), -1)
        return half.float().to(vectors.device)

    def attach(self, store: GradientStore) -> None:
        self.inner.attach(store)
        if not self.symmetric:
            if store.complete:
                self.preconditioner = stored_preconditioner(store)
            return
        if PRECONDITION_TRANSFORM not in store.transforms():
            if store.complete:
                stored_preconditioner(store)  # says what is missing
            store.write_transform(PRECONDITION_TRANSFORM, self._fit_before_build(store).pack(), exclusive=True)
        self.preconditioner = stored_preconditioner(store, allow_incomplete=True)

    def _fit_before_build(self, store: GradientStore) -> Preconditioner:
        """The factors of ``factor_samples`` evenly spaced training samples' rows (kept in memory: two passes)."""
        from gradindex.task import iter_batches

        task = self.inner.task
        count = min(self.options["factor_samples"], len(task.train))
        picked = np.unique(np.linspace(0, len(task.train) - 1, num=count).round().astype(np.int64)).tolist()
        size = max(1, min(256, self.inner.batch_size_hint()))
        with torch.enable_grad():
            rows = [
                self.inner.featurize(batch).double().cpu()
                for batch in iter_batches(task.train, picked, size, task.collate)
            ]
        rows = [block[torch.isfinite(block).all(dim=1)] for block in rows]  # a NaN sample must not poison H
        groups = precondition_groups({**store.fingerprint, "block_dim": self.inner.block_dim})
        weights = [float(item["weight"]) for item in store.fingerprint["checkpoints"]]
        queries = self._query_rows()
        return Preconditioner.fit(
            lambda: rows,
            groups,
            weights,
            self.options["precondition"],
            mix_rows=None if queries is None else lambda: queries,
            mix=self.options["precondition_mix"],
        )

    def _query_rows(self) -> list[Tensor] | None:
        """With ``precondition_mix``: the rows (as stored) of at most ``factor_samples`` evenly spaced samples of the
        task's test split, whose curvature is mixed in (None without mixing).

        Raises:
            ArgumentError: the task has no test split.
        """
        if not self.options["precondition_mix"]:
            return None
        from gradindex.task import iter_batches

        task = self.inner.task
        if task.test is None or len(task.test) == 0:
            raise ArgumentError(
                "precondition_mix",
                f"precondition_mix mixes in the curvature of the task's queries, but task {task.name!r} has no test "
                "split; give the task a test dataset or leave precondition_mix out",
            )
        count = min(self.options["factor_samples"], len(task.test))
        picked = np.unique(np.linspace(0, len(task.test) - 1, num=count).round().astype(np.int64)).tolist()
        size = max(1, min(256, self.inner.batch_size_hint()))
        with torch.enable_grad():
            rows = [
                self.inner.featurize(batch).double().cpu()
                for batch in iter_batches(task.test, picked, size, task.collate)
            ]
        return [block[torch.isfinite(block).all(dim=1)] for block in rows]

    def finish(self, store: GradientStore) -> None:
        if not self.symmetric:
            queries = self._query_rows()
            finish_precondition(
                store,
                self.options["precondition"],
                self.options["damping"],
                mix_rows=None if queries is None else lambda: queries,
                mix=self.options["precondition_mix"],
            )

    def configure_query(self, options: Mapping[str, Any], store_path: Any = "this store") -> None:
        super().configure_query(options, store_path)
        damping = self.query_settings["damping"]
        if self.symmetric and damping != self.options["damping"]:
            raise IncompatibleStoreError(
                f"store {store_path} was built with precondition_side=both damping={self.options['damping']!r}, "
                f"fixed in its vectors; this query asks for damping={damping!r}. Query without damping, or rebuild "
                "with precondition_side=query (any damping at query time)"
            )

    def query_vectors(self, batch: Any) -> Tensor:
        """collated batch of B queries -> [B, C·k]: [η_c (H_rows,c + λ)^{-1} v_c(q)]_c (``both``: φ(q))."""
        if self.symmetric:
            return self.featurize(batch)
        if self.preconditioner is None:
            raise IncompleteStoreError(
                "preconditioned queries need the store's factors, written when its build completes; finish it with "
                "resume=True"
            )
        vectors = self.inner.featurize(batch)
        return self.preconditioner.inverse(vectors, self.query_settings["damping"]).float().to(vectors.device)

    def __getattr__(self, name: str) -> Any:  # the wrapped featurizer's own attributes (task, plans, kron, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
