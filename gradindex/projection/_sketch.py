"""The top eigenpairs of a pca side's second moment, at a cost bounded by the rank kept rather than the width.

A side's moment is ``M = Σ_r w_r x_r x_rᵀ`` over the calibration positions ``x_r`` (``[width]`` each, ``w_r`` the
squared norm of the other side; see ``KronGradients.side_moments``). A narrow side needs only its top ``k``
eigenvectors and, for the plan's split of k (``plan_kron``), the share of energy its top eigenvalues hold.

* Narrow widths (``exact_width``): the moment is formed (float64) and decomposed exactly (``eigh``), under one thread
  (``torch_threads``): LAPACK's threaded eigensolvers are slower on small matrices than one thread, many times so on a
  busy machine.
* Wider sides never form the ``[width, width]`` moment: a ``SideSketch`` streams the calibration positions once into
  ``Y = M Ω`` (``Ω`` a seeded orthonormalised Gaussian ``[width, l]``, float32 products, float64 accumulation), the
  trace alongside, and ``SideSketch.eigen`` takes the Nyström approximation ``M ≈ Y (ΩᵀY)⁻¹ Yᵀ`` apart (Tropp et al.
  2017, "Fixed-rank approximation of a positive-semidefinite matrix from streaming data": a shift, a Cholesky and an
  SVD of ``[width, l]``). Cost ``O(positions·width·l)`` for the stream and ``O(width·l²)`` afterwards; the
  sketch's ``l`` top eigenvalues and the trace give the spectrum (the energy left spread evenly over the other
  directions: never more per direction than the last one kept), its top eigenvectors the side.
* A moment formed anyway (``pca_side_matrix`` of a wide ``[width, width]`` moment) gets randomized subspace
  iteration on it (``top_eigen``), again seeded.

Every random matrix comes from a CPU generator seeded from ``derive_seed``, so a build is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SKETCH_MIN_WIDTH",
    "SMALL_FLOPS",
    "SideEigen",
    "SideSketch",
    "exact_side_eigen",
    "exact_width",
    "sketch_rank",
    "small_kernel",
    "top_eigen",
    "torch_threads",
]

# sides at most this wide are decomposed exactly (formed moment, eigh): cheap, and the whole spectrum
SKETCH_MIN_WIDTH = 512
# the sketch of a side keeps at least this many directions
SKETCH_MIN_RANK = 128


# a dense kernel of fewer floating-point operations than this runs on one thread (``small_kernel``): a parallel
# region's start and join cost more than such a kernel, many times more when other processes hold the cores
SMALL_FLOPS = 1 << 27


def small_kernel(flops: float) -> AbstractContextManager:
    """One thread (``torch_threads(1)``) for a kernel of fewer than ``SMALL_FLOPS`` operations, else no change."""
    return torch_threads(1) if flops < SMALL_FLOPS else nullcontext()


@contextmanager
def torch_threads(count: int = 1) -> Iterator[None]:
    """Run the block with ``count`` intra-op torch threads (small dense kernels: eigh, QR, SVD of thin matrices), and
    restore the previous number afterwards."""
    before = torch.get_num_threads()
    if before == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sketch_rank(width: int, dim: int, k: int = 0) -> int:
    """How many directions a side's sketch keeps: enough for the k a plan of ``dim`` dimensions can give one side
    (about 4·√dim, at least ``SKETCH_MIN_RANK``), or for a known ``k`` with half as many again to spare; never more
    than the width."""
    wanted = max(SKETCH_MIN_RANK, 4 * math.isqrt(max(1, dim)), k + max(16, k // 2))
    return min(width, wanted)


def exact_width(width: int, rank: int) -> bool:
    """Whether a side of ``width`` is decomposed exactly (formed moment) rather than sketched to ``rank``
    directions: narrow sides, and sides whose sketch would keep a large share of the width anyway."""
    return width <= SKETCH_MIN_WIDTH or 2 * rank >= width


@dataclass
class SideEigen:
    """A side's top eigenpairs: ``values`` float64 ``[r]`` (largest first), ``vectors`` ``[width, r]`` (None: values
    only), and the moment's ``trace`` (its total energy, the directions not kept included)."""

    values: Tensor
    vectors: Tensor | None
    trace: float
    width: int

    @property
    def rank(self) -> int:
        return 0 if self.vectors is None else int(self.vectors.shape[1])

    def spectrum(self) -> list[float]:
        """``width`` eigenvalues, largest first: the ones kept (of a sketch, its first two thirds: its last values
        are underestimated), then what the trace leaves spread evenly over the other directions (at most the last kept
        value, so the list stays non-increasing)."""
        trusted = self.width if self.rank == self.width else max(1, 2 * len(self.values) // 3)
        values = self.values.clamp(min=0).tolist()[:trusted]
        missing = self.width - len(values)
        if missing > 0:
            left = max(0.0, self.trace - sum(values)) / missing
            values += [min(left, values[-1]) if values else left] * missing
        return values

    def matrix(self, k: int) -> Tensor:
        """The ``[width, k]`` float32 side: the top-k eigenvectors, each column's largest entry positive."""
        if self.vectors is None or k > self.rank:
            raise ValueError(f"this decomposition keeps {self.rank} directions, not the {k} asked for")
        return _fix_signs(self.vectors[:, :k].double()).float().contiguous()


def _fix_signs(vectors: Tensor) -> Tensor:
    peaks = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))
    return vectors * torch.where(peaks < 0, -1.0, 1.0).to(vectors.dtype)


def exact_side_eigen(moment: Tensor) -> SideEigen:
    """Every eigenpair of a formed ``[width, width]`` moment (float64 eigh under one thread), largest first."""
    moment = moment.detach().double().cpu()
    with torch_threads(1):
        values, vectors = torch.linalg.eigh((moment + moment.T) / 2)
    return SideEigen(values.flip(0), vectors.flip(1), float(moment.diagonal().sum()), moment.shape[0])


def _orthonormal_gaussian(width: int, rank: int, seed: int) -> Tensor:
    """``[width, rank]`` float64 with orthonormal columns: a seeded Gaussian's QR (signs fixed by R's diagonal)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    gaussian = torch.randn(width, rank, generator=generator, dtype=torch.float64)
    with torch_threads(1):
        q, r = torch.linalg.qr(gaussian)
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


class SideSketch:
    """A one-pass sketch ``Y = M Ω`` of a side's moment ``M = Σ w x xᵀ`` (plus a diagonal part and the trace), never
    forming ``M``; ``eigen()`` gives its top eigenpairs (single-pass Nyström).

    Args:
        width: the side's width.
        rank: the sketch's number of directions ``l`` (``sketch_rank``).
        seed: the seed of ``Ω`` (``derive_seed`` of the side: the same side always gets the same sketch).
        device: where the streamed products run (the positions' device).
    """

    def __init__(self, width: int, rank: int, seed: int, device: torch.device | str = "cpu"):
        self.width, self.rank = width, min(rank, width)
        self.omega = _orthonormal_gaussian(width, self.rank, seed)
        self._omega = self.omega.to(device, torch.float32)
        self.y = torch.zeros(width, self.rank, dtype=torch.float64, device=device)
        self.diagonal: Tensor | None = None
        self.trace = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: Tensor, weight: Tensor | None = None) -> None:
        """Add ``Σ_r w_r x_r x_rᵀ`` for positions ``x`` ``[R, width]`` with weights ``w`` ``[R]`` (None: 1)."""
        x = x.float()
        with small_kernel(4.0 * x.shape[0] * self.width * self.rank):
            projected = x @ self._omega  # [R, l]
            if weight is not None:
                projected = projected * weight.reshape(-1, 1).float()
            self.y += (x.T @ projected).double()
            energy = torch.linalg.vecdot(x, x).double()
            self.trace += (energy if weight is None else energy * weight.reshape(-1).double()).sum()

    def add_diagonal(self, index: Tensor, values: Tensor) -> None:
        """Add ``values`` at diagonal entries ``index`` of the moment (a tied embedding's token energies)."""
        if self.diagonal is None:
            self.diagonal = torch.zeros(self.width, dtype=torch.float64, device=self.y.device)
        self.diagonal.index_add_(0, index, values.double())

    def eigen(self) -> SideEigen:
        """The sketch's eigenpairs (``rank`` of them, largest first) and the moment's trace."""
        y = self.y.cpu()
        trace = float(self.trace)
        if self.diagonal is not None:
            diagonal = self.diagonal.cpu()
            y = y + diagonal[:, None] * self.omega
            trace += float(diagonal.sum())
        return _nystrom(y, self.omega, trace)


def _nystrom(y: Tensor, omega: Tensor, trace: float) -> SideEigen:
    """The eigenpairs of ``Y (ΩᵀY)⁻¹ Yᵀ`` for ``Y = M Ω`` (stable: shifted by ν, Cholesky, thin SVD), float64."""
    width = y.shape[0]
    norm = float(torch.linalg.matrix_norm(y, ord="fro"))
    if norm == 0.0 or not math.isfinite(norm):
        values = torch.zeros(y.shape[1], dtype=torch.float64)
        return SideEigen(values, omega.clone(), trace if math.isfinite(trace) else 0.0, width)
    # the stream's products are float32: a shift at that precision keeps ΩᵀY positive definite
    shift = 1e-6 * norm
    with torch_threads(1):
        for _ in range(6):
            shifted = y + shift * omega
            core = omega.T @ shifted
            factor, info = torch.linalg.cholesky_ex((core + core.T) / 2)
            if int(info) == 0:
                break
            shift *= 10.0
        solved = torch.linalg.solve_triangular(factor, shifted.T, upper=False).T  # Y_ν C⁻ᵀ
        vectors, singular, _ = torch.linalg.svd(solved, full_matrices=False)
    values = (singular.square() - shift).clamp(min=0)
    return SideEigen(values, vectors, trace, width)


def top_eigen(moment: Tensor, k: int, seed: int, iterations: int = 3) -> SideEigen:
    """The top ``k`` eigenpairs of a formed ``[width, width]`` moment by randomized subspace iteration (a seeded
    ``[width, k + p]`` start, ``iterations`` power steps with re-orthonormalisation, Rayleigh-Ritz), float64."""
    moment = moment.detach().double().cpu()
    moment = (moment + moment.T) / 2
    width = moment.shape[0]
    rank = min(width, k + max(16, k // 2))
    basis = _orthonormal_gaussian(width, rank, seed)
    for _ in range(iterations):
        product = moment @ basis  # the one large product: every thread
        with torch_threads(1):
            basis, _ = torch.linalg.qr(product)
    small = basis.T @ (moment @ basis)
    with torch_threads(1):
        values, rotation = torch.linalg.eigh((small + small.T) / 2)
    vectors = basis @ rotation.flip(1)
    return SideEigen(values.flip(0), vectors, float(moment.diagonal().sum()), width)
