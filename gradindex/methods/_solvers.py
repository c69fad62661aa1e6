"""Inverse Hessian-vector products (H + λI)^{-1} g and top eigenpairs, from curvature products.

* ``ExactSolver``  — the dense matrix, eigendecomposed once; any damping is then one matrix product.
* ``CGSolver``     — conjugate gradients on many right-hand sides at once (one data pass per iteration).
* ``LissaSolver``  — LiSSA (Agarwal et al. 2017, as in Koh & Liang): h ← g + h − (H_batch + λI) h / s on
  sampled mini-batches, x = h / s; averaged over repeats. Its fixed point is (H + λI)^{-1} g.
* ``arnoldi``      — Arnoldi iteration with full re-orthogonalisation (Schioppa et al. 2022); on the
  symmetric H its Hessenberg matrix is tridiagonal (Lanczos) and its Ritz pairs approximate the
  extreme eigenpairs; with as many iterations as parameters they are exact.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from gradindex.errors import GradIndexWarning
from gradindex.methods._base import damping_error
from gradindex.methods._curvature import Curvature
from gradindex.task import gather_batch

__all__ = ["MAX_EXACT_PARAMS", "CGSolver", "ExactSolver", "LissaSolver", "arnoldi"]

log = logging.getLogger("gradindex")

MAX_EXACT_PARAMS = 10_000
# LiSSA has converged when its mean iterate over the last tenth of its iterations differs from the mean over the
# tenth before it by less than this (relative, worst right-hand side)
LISSA_TOL = 0.05
_LAST: dict[str, tuple] = {}  # what -> (task, Curvature.key(), value); see _cached


def _what(curvature: Curvature) -> str:
    return "the Hessian" if curvature.kind == "hessian" else "the Gauss-Newton matrix"


def _cached(curvature: Curvature, what: str, compute: Callable[[], object], *extra: object) -> object:
    """The last ``what`` (the dense matrix, a factorisation) of one curvature, kept for the process: keyed by the task
    object, ``Curvature.key()`` and ``extra``, so a build and the queries that follow it in one session (a notebook,
    the quality harness) form and factorise the matrix once."""
    key = (curvature.key(), *extra)
    cached = _LAST.get(what)
    if cached is not None and cached[0] is curvature.task and cached[1] == key:
        return cached[2]
    _LAST.pop(what, None)  # free the previous one before forming a new [p, p]
    value = compute()
    _LAST[what] = (curvature.task, key, value)
    return value


class ExactSolver:
    """(H + λI)^{-1} G through the Cholesky factor of the dense H + λI (small models).

    A Cholesky factorisation costs p³/3 operations, an order of magnitude less than the eigendecomposition
    that would serve every damping at once (minutes against seconds at p = 4,000 on 2 cores); each damping
    asked for gets its own factor.
    """

    def __init__(self, curvature: Curvature):
        if curvature.n_params > MAX_EXACT_PARAMS:
            raise ValueError(
                f"--solver exact builds the {curvature.n_params}x{curvature.n_params} Hessian, more than the "
                f"{MAX_EXACT_PARAMS} parameters it is meant for; use --solver cg or lissa, or restrict --layers"
            )
        self.curvature = curvature

    def matrix(self) -> Tensor:
        """The dense ``[p, p]`` curvature, float64 (the last one is kept: see ``_cached``)."""
        return _cached(self.curvature, "dense", self.curvature.dense)

    def factor(self, damping: float) -> Tensor:
        """The lower Cholesky factor of H + λI, float64; not positive definite: the error names the damping that fixes
        it."""

        def compute() -> Tensor:
            matrix = self.matrix()
            factor, info = torch.linalg.cholesky_ex(
                matrix + damping * torch.eye(len(matrix), dtype=matrix.dtype, device=matrix.device)
            )
            if int(info) == 0:
                diagonal = factor.diagonal()
                # a pivot at rounding level: positive definite only by accident of rounding
                if float(diagonal.min()) ** 2 > 1e-12 * max(float(matrix.diagonal().abs().max()), 1e-30):
                    return factor
            values = torch.linalg.eigvalsh(matrix)
            raise damping_error(_what(self.curvature), float(values.min()), damping)

        return _cached(self.curvature, "cholesky", compute, float(damping))

    def solve(self, rhs: Tensor, damping: float) -> Tensor:
        """``[B, p] -> [B, p]``: rows of (H + λI)^{-1} G."""
        factor = self.factor(damping)
        solution = torch.cholesky_solve(rhs.to(factor.device, torch.float64).T, factor)
        return solution.T.float()


class CGSolver:
    """Conjugate gradients for (H + λI) X = G, every row of G solved together."""

    def __init__(self, curvature: Curvature, *, max_iter: int = 100, tol: float = 1e-6):
        self.curvature = curvature
        self.max_iter = max_iter
        self.tol = tol

    def _operator(self, n_rhs: int) -> Callable[[Tensor], Tensor]:
        """Products with H: from the formed matrix when the solves would cost more curvature products than it has
        columns (many right-hand sides on a small model, e.g. the self-influence of every training sample),
        else one pass over the data per iteration."""
        curvature = self.curvature
        if curvature.n_params <= MAX_EXACT_PARAMS and n_rhs * self.max_iter >= curvature.n_params:
            # float32 like the products it replaces (CG itself runs in float64)
            matrix = _cached(curvature, "dense32", lambda: _cached(curvature, "dense", curvature.dense).float())
            return lambda p: (p.float() @ matrix).double()
        return lambda p: curvature.matvec(p.float()).double()

    def solve(self, rhs: Tensor, damping: float) -> Tensor:
        b = rhs.to(self.curvature.device, torch.float64)
        operator = self._operator(len(b))
        x = torch.zeros_like(b)
        r = b.clone()
        direction = r.clone()
        r_norm2 = (r * r).sum(dim=1)
        target = self.tol * r_norm2.sqrt()
        active = r_norm2.sqrt() > target
        iteration = 0
        while bool(active.any()) and iteration < self.max_iter:
            iteration += 1
            rows = active.nonzero().squeeze(1)
            p = direction[rows]
            product = operator(p) + damping * p
            curvature_along = (p * product).sum(dim=1)
            if bool((curvature_along <= 0).any()):
                raise ValueError(
                    f"{_what(self.curvature)} + λI is not positive definite (conjugate gradients met a direction of "
                    f"non-positive curvature at λ={damping:g}); raise --damping"
                    + (" or use --hessian ggn" if self.curvature.kind == "hessian" else "")
                )
            alpha = r_norm2[rows] / curvature_along
            x[rows] += alpha[:, None] * p
            r[rows] -= alpha[:, None] * product
            new_norm2 = (r[rows] * r[rows]).sum(dim=1)
            beta = new_norm2 / r_norm2[rows]
            direction[rows] = r[rows] + beta[:, None] * p
            r_norm2[rows] = new_norm2
            active = r_norm2.sqrt() > target
        if bool(active.any()):
            worst = float((r_norm2.sqrt() / b.norm(dim=1).clamp_min(1e-300)).max())
            log.warning(
                "conjugate gradients stopped after %d iterations with relative residual %.2g; raise cg_max_iter",
                iteration,
                worst,
            )
        return x.float()


class LissaSolver:
    """LiSSA's stochastic Neumann series for (H + λI)^{-1} G, with seeded mini-batches."""

    def __init__(
        self,
        curvature: Curvature,
        *,
        depth: int = 1000,
        scale: float | None = None,
        repeats: int = 1,
        batch_size: int = 64,
        seed: int = 0,
    ):
        self.curvature = curvature
        self.depth = depth
        self.scale = scale
        self.repeats = repeats
        self.batch_size = min(batch_size, curvature.n_samples)
        self.seed = seed
        self._auto_scale: float | None = None

    def scale_for(self, damping: float) -> float:
        if self.scale is not None:
            return self.scale
        if self._auto_scale is None:
            self._auto_scale = self.curvature.largest_eigenvalue(seed=self.seed)
        return 1.5 * (self._auto_scale + damping) or 1.0

    def solve(self, rhs: Tensor, damping: float) -> Tensor:
        curvature = self.curvature
        scale = self.scale_for(damping)
        g = rhs.to(curvature.device, torch.float32)
        total = torch.zeros_like(g, dtype=torch.float64)
        limit = 1e6 * max(float(g.abs().max()), 1e-30) * max(scale, 1.0) * self.depth
        # convergence: the mean iterate over the last tenth of the iterations against the tenth before it
        # (averaging keeps the mini-batch noise of a converged recursion out of the comparison)
        window = max(1, self.depth // 10)
        self.relative_change = 0.0
        for repeat in range(self.repeats):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + repeat)
            h = g.clone()
            means = [torch.zeros_like(total), torch.zeros_like(total)]
            if self.depth < 2 * window:
                means[1] += g.double()  # a single iteration: compared with the starting point
            for step in range(self.depth):
                rows = torch.randint(0, curvature.n_samples, (self.batch_size,), generator=generator)
                batch = gather_batch(curvature.task.train, rows, curvature.task.collate, curvature.device)
                h = g + h - (curvature.matvec_on(batch, self.batch_size, h) + damping * h) / scale
                position = (self.depth - 1 - step) // window  # 0: the last window, 1: the one before
                if position < 2:
                    means[position] += h.double() / window
            peak = float(h.abs().max())
            if not math.isfinite(peak) or peak > limit:
                raise ValueError(
                    f"LiSSA diverged (scale {scale:.3g}, λ={damping:g}): the scale must exceed the largest eigenvalue "
                    "of "
                    f"{_what(curvature)} + λI on every mini-batch, and the curvature must be positive; "
                    "raise --lissa-scale or --lissa-batch-size, or raise --damping"
                )
            change = float(((means[0] - means[1]).norm(dim=1) / means[0].norm(dim=1).clamp_min(1e-300)).max())
            self.relative_change = max(self.relative_change, change)
            total += h.double() / scale
        if self.relative_change > LISSA_TOL:
            growing = bool(self.relative_change > 1.0)
            warnings.warn(
                f"LiSSA did not converge (scale {scale:.3g}, λ={damping:g}, depth {self.depth}): its estimate moved by "
                f"{self.relative_change:.0%} between the last two tenths of its iterations"
                + (
                    " and is growing: raise --lissa-scale above the largest eigenvalue of the curvature (or leave it "
                    "unset "
                    "to estimate it), or raise --damping"
                    if growing
                    else "; raise --lissa-depth, or raise --damping (faster convergence), or use --solver cg or exact"
                ),
                GradIndexWarning,
                stacklevel=2,
            )
        return (total / self.repeats).float()


def arnoldi(
    matvec: Callable[[Tensor], Tensor],
    n_params: int,
    rank: int,
    iterations: int,
    *,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
) -> tuple[Tensor, Tensor]:
    """Top-``rank`` eigenpairs (largest eigenvalues first) of a symmetric operator: ``(values [r], vectors [p, r])``
    float64.

    ``matvec`` maps a float32 ``[1, p]`` to ``[1, p]``. Arnoldi iteration from a seeded random start,
    full re-orthogonalisation (twice, Gram–Schmidt); when the Krylov space closes early it continues
    from a fresh random vector orthogonal to it, so ``iterations = n_params`` recovers the whole spectrum.
    """
    if not 1 <= rank <= iterations <= n_params:
        raise ValueError(f"Arnoldi needs 1 <= rank ({rank}) <= iterations ({iterations}) <= parameters ({n_params})")
    generator = torch.Generator().manual_seed(seed)

    def fresh(basis: Tensor, count: int) -> Tensor | None:
        for _ in range(5):
            vector = torch.randn(n_params, generator=generator, dtype=torch.float64).to(device)
            for _ in range(2):
                vector -= basis[:count].T @ (basis[:count] @ vector) if count else 0.0
            norm = float(vector.norm())
            if norm > 1e-8:
                return vector / norm
        return None

    basis = torch.zeros(iterations + 1, n_params, dtype=torch.float64, device=device)
    hessenberg = torch.zeros(iterations + 1, iterations, dtype=torch.float64)
    start = fresh(basis, 0)
    if start is None:  # pragma: no cover - a random Gaussian vector is never zero
        raise ValueError("could not draw a starting vector for Arnoldi")
    basis[0] = start
    scale = 0.0
    size = iterations
    for j in range(iterations):
        w = matvec(basis[j].float().unsqueeze(0))[0].to(torch.float64)
        if not bool(torch.isfinite(w).all()):
            raise ValueError("a Hessian-vector product is not finite; check the checkpoint and the data for NaN/inf")
        scale = max(scale, float(w.norm()))
        for _ in range(2):  # twice is enough (Kahan–Parlett)
            coefficients = basis[: j + 1] @ w
            w -= basis[: j + 1].T @ coefficients
            hessenberg[: j + 1, j] += coefficients.cpu()
        norm = float(w.norm())
        if j + 1 == iterations:
            break
        if norm <= 1e-10 * max(scale, 1e-30):
            # an invariant subspace: restart orthogonally (its coupling to the new vector is zero)
            restart = fresh(basis, j + 1)
            if restart is None:
                size = j + 1
                break
            basis[j + 1] = restart
        else:
            hessenberg[j + 1, j] = norm
            basis[j + 1] = w / norm
    projected = hessenberg[:size, :size]
    projected = 0.5 * (projected + projected.T)  # exact arithmetic makes it symmetric tridiagonal
    values, vectors = torch.linalg.eigh(projected)
    order = torch.argsort(values, descending=True)[:rank]
    if len(order) < rank:
        raise ValueError(
            f"the operator has only {len(order)} independent directions; lower --rank to at most {len(order)}"
        )
    ritz = basis[:size].T @ vectors[:, order].to(device)
    return values[order].to(device), ritz
