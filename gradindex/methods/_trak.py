"""TRAK (Park et al. 2023): projected gradients of the margin, a query-side (ΦᵀΦ + λI)^{-1} per checkpoint.

For checkpoints c = 1..C, with f the task's output function (the classification margin
log p/(1 − p) by default) and P_c the projection of checkpoint c:

    φ_c(z) = P_c ∇_θ f(z; θ_c)                 Φ_c = [φ_c(z_1); …; φ_c(z_N)]    (N × k)
    Q(z)   = (1/C) Σ_c (1 − p_c(z)),  p_c(z) = σ(f(z; θ_c))                       (out-to-loss)
    score(q, z) = Q(z) · (1/C) Σ_c φ_c(z)ᵀ (Φ_cᵀΦ_c + λ_c I)^{-1} φ_c(q)

The store row of z is Q(z)·[φ_1(z), …, φ_C(z)]; a query vector is (1/C)[(Φ_cᵀΦ_c + λI)^{-1} φ_c(q)]_c,
so FAISS's inner product is the TRAK score. Φ_cᵀΦ_c (k × k per checkpoint) is accumulated shard by
shard (``transforms/_parts/trak_gram``), summed when the last shard is done into
``transforms/trak_gram``, and inverted at query time with the λ asked for: one index, many λ.
Self-influence ⟨T φ(z), φ(z)⟩ = Q(z)·(1/C) Σ_c φ_cᵀ(Φ_cᵀΦ_c + λI)^{-1}φ_c is written then too
(``transforms/self_influence``), from the stored rows and ``transforms/trak_out_to_loss``.

The checkpoints are TRAK's models: pass the final checkpoints of C independently trained runs (TRAK-C; the paper's
ensemble, and dattri's TRAK-10 / TRAK-50), or several checkpoints of one run; each gets its own Φ_c and the scores
are averaged. λ defaults to ``auto``: 0.1 × the mean eigenvalue of each Φ_cᵀΦ_c (kronfluence's damping heuristic),
which does not depend on the gradients' scale, the number of samples or k. A fixed absolute λ is tiny beside
ΦᵀΦ's large eigenvalues and the inverse is then dominated by its smallest ones, noise once k nears the rank of Φ_c
(benchmarks/RESULTS.md, quality section: TRAK on the MNIST-5k MLP).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from gradindex.errors import ArgumentError, IncompleteStoreError
from gradindex.featurize import LoadedCheckpoint, LossModule
from gradindex.methods._base import _BuiltinMethod, check_gradient_projection, row_dots
from gradindex.projection import ProjectionSpec
from gradindex.task import Task, batch_size, slice_batch, to_device

if TYPE_CHECKING:
    from gradindex.store import GradientStore

__all__ = ["RELATIVE_DAMPING", "GramInverse", "TrakFeaturizer", "finish_trak", "trak_self_influence"]

GRAM = "trak_gram"
OUT_TO_LOSS = "trak_out_to_loss"
RELATIVE_DAMPING = 0.1  # λ = RELATIVE_DAMPING × mean eigenvalue of Φ_cᵀΦ_c when damping is None ("auto")


class GramInverse:
    """(G_c + λI)^{-1} for each checkpoint's Gram matrix G_c, from one eigendecomposition each (any λ after)."""

    def __init__(self, gram: np.ndarray | Tensor):
        gram = torch.as_tensor(np.asarray(gram), dtype=torch.float64)
        if gram.ndim != 3 or gram.shape[1] != gram.shape[2]:
            raise ValueError(f"a TRAK Gram transform must be [C, k, k], got {list(gram.shape)}")
        self.values, self.vectors = torch.linalg.eigh(0.5 * (gram + gram.transpose(1, 2)))

    def dampings(self, damping: float | None) -> Tensor:
        """``[C]`` float64: each checkpoint's λ_c: ``damping`` itself, or for None (auto) RELATIVE_DAMPING × the mean
        eigenvalue of G_c."""
        if damping is None:
            return RELATIVE_DAMPING * self.values.clamp_min(0).mean(dim=1)
        return torch.full(self.values.shape[:1], float(damping), dtype=torch.float64)

    def matrices(self, damping: float | None) -> Tensor:
        """``[C, k, k]`` float64: (G_c + λ_c I)^{-1}, λ_c from ``dampings``."""
        shifted = self.values + self.dampings(damping).unsqueeze(1)
        for position in range(shifted.shape[0]):
            floor = 1e-12 * max(float(self.values[position].abs().max()), 1e-30)
            if float(shifted[position].min()) <= floor:
                rank = int((self.values[position] > floor).sum())
                asked = "auto" if damping is None else f"{damping:g}"
                raise ValueError(
                    f"ΦᵀΦ of checkpoint {position} is singular at λ={asked} (rank {rank} of {shifted.shape[1]}): "
                    "query with a positive damping (e.g. damping=0.01), or rebuild with a smaller proj_dim"
                )
        return (self.vectors / shifted.unsqueeze(1)) @ self.vectors.transpose(1, 2)


def trak_self_influence(
    store: GradientStore,
    damping: float | None,
    *,
    gram: np.ndarray | None = None,
    out_to_loss: np.ndarray | None = None,
) -> np.ndarray:
    """``(N,)`` float32: Q(z)·(1/C) Σ_c φ_c(z)ᵀ(Φ_cᵀΦ_c + λ_c I)^{-1}φ_c(z) for every row, from the stored rows
    (``damping`` None: λ_c = RELATIVE_DAMPING × the mean eigenvalue of Φ_cᵀΦ_c)."""
    gram = store.read_transform(GRAM) if gram is None else gram
    weights = store.read_transform(OUT_TO_LOSS) if out_to_loss is None else out_to_loss
    inverses = GramInverse(gram).matrices(damping)
    n_checkpoints, block_dim = inverses.shape[0], inverses.shape[1]
    scores = np.zeros(store.n_samples, dtype=np.float64)
    for first_row, block in store.iter_blocks(allow_incomplete=True):
        rows = torch.from_numpy(np.asarray(block, dtype=np.float64)).reshape(len(block), n_checkpoints, block_dim)
        quadratic = torch.einsum("bci,cij,bcj->b", rows, inverses, rows).numpy()
        weight = weights[first_row : first_row + len(block)].astype(np.float64)
        # the rows hold Q(z)·φ(z): divide one Q back out (Q == 0 only when the sample's weight underflowed)
        with np.errstate(divide="ignore", invalid="ignore"):
            scores[first_row : first_row + len(block)] = np.where(weight > 0, quadratic / (n_checkpoints * weight), 0.0)
    return scores.astype(np.float32)


def finish_trak(store: GradientStore, damping: float | None) -> None:
    """Every shard is written: sum the shards' ΦᵀΦ, gather the out-to-loss weights, write the self-influence at λ."""
    grams = store.read_transform_parts(GRAM)
    weights = store.read_transform_parts(OUT_TO_LOSS)
    missing = [shard for shard in range(store.n_shards) if shard not in grams or shard not in weights]
    if missing:
        raise IncompleteStoreError(
            f"store {store.path} lacks the ΦᵀΦ parts of shards {missing[:10]}; rebuild them with "
            "`gradindex build ... --resume --repair` or rebuild the store with overwrite=True"
        )
    gram = sum(grams[shard].astype(np.float64) for shard in range(store.n_shards))
    out_to_loss = np.concatenate([weights[shard] for shard in range(store.n_shards)]).astype(np.float32)
    if out_to_loss.shape != (store.n_samples,):
        raise IncompleteStoreError(
            f"store {store.path} has {out_to_loss.shape[0]} out-to-loss weights for {store.n_samples} rows; rebuild "
            "with overwrite=True"
        )
    self_scores = trak_self_influence(store, damping, gram=gram, out_to_loss=out_to_loss)
    store.write_transform(GRAM, gram)
    store.write_transform(OUT_TO_LOSS, out_to_loss)
    store.write_transform("self_influence", self_scores)


class TrakFeaturizer(_BuiltinMethod):
    """``trak``: store rows Q(z)·[P_c∇f(z; θ_c)]_c; query (1/C)[(Φ_cᵀΦ_c + λI)^{-1} P_c∇f(q; θ_c)]_c."""

    method = "trak"
    symmetric = False

    def __init__(
        self,
        task: Task,
        checkpoints: Sequence[LoadedCheckpoint],
        *,
        projection: ProjectionSpec,
        layers: Sequence[str] | None = None,
        normalize: bool = False,
        device: torch.device = torch.device("cpu"),
        options: Mapping[str, Any] | None = None,
    ):
        check_gradient_projection("trak", projection)
        if not checkpoints:
            raise ArgumentError("checkpoints", "method=trak needs at least one checkpoint", also=["method"])
        model = self._setup("trak", task, layers=layers, normalize=normalize, device=device, options=options)
        self.checkpoints = list(checkpoints)
        margin = task.margin
        self._setup_gradients(model, margin, self.checkpoints)
        self._margin = LossModule(model, margin).eval()
        self._setup_projection(projection)
        self.n_checkpoints = len(self.checkpoints)
        self.dim = self.block_dim * self.n_checkpoints
        self._inverse: GramInverse | None = None
        self._gram_sum: Tensor | None = None
        self._weights: list[Tensor] = []

    def fingerprint(self) -> dict:
        return self._projected_fingerprint()

    # ---- vectors ----------------------------------------------------------------------------
    def features(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(φ [B, C, k], Q [B])``: projected margin gradients per checkpoint and the out-to-loss weight."""
        batch = to_device(batch, self.device)
        size = batch_size(batch)
        phi = torch.empty(size, self.n_checkpoints, self.block_dim, dtype=torch.float32, device=self.device)
        weights = torch.zeros(size, dtype=torch.float64, device=self.device)
        for start in range(0, size, self.chunk_size):
            stop = min(size, start + self.chunk_size)
            chunk = slice_batch(batch, start, stop)
            for position, (params, constants) in enumerate(self._states):
                block = self.projector.project(self.gradients(chunk, params, constants), position)
                if self.normalize:
                    block = torch.nn.functional.normalize(block, dim=1)
                phi[start:stop, position] = block
                with torch.no_grad():
                    margins = functional_call(self._margin, {**constants, **params}, (chunk,))
                weights[start:stop] += torch.sigmoid(-margins.detach().double()) / self.n_checkpoints
        if not self.options["out_to_loss"]:
            weights = torch.ones_like(weights)
        return phi, weights.float()

    def featurize(self, batch: Any) -> Tensor:
        """collated batch of B samples -> [B, C·k]: the store rows Q(z)·φ(z)."""
        phi, weights = self.features(batch)
        return (phi * weights[:, None, None]).reshape(len(phi), self.dim)

    # ---- build stages -----------------------------------------------------------------------
    def begin_shard(self, shard: int) -> None:
        self._gram_sum = torch.zeros(
            self.n_checkpoints, self.block_dim, self.block_dim, dtype=torch.float64, device=self.device
        )
        self._weights = []

    def featurize_train(self, batch: Any) -> tuple[Tensor, Tensor]:
        phi, weights = self.features(batch)
        if self._gram_sum is None:
            self.begin_shard(-1)
        # a non-finite row (stored as zeros under --nonfinite skip/zero) must not poison ΦᵀΦ
        finite = torch.isfinite(phi).flatten(1).all(dim=1) & torch.isfinite(weights)
        doubled = torch.where(finite[:, None, None], phi.double(), 0.0)
        self._gram_sum += torch.einsum("bci,bcj->cij", doubled, doubled)
        self._weights.append(torch.where(finite, weights, 0.0).cpu())
        rows = (phi * weights[:, None, None]).reshape(len(phi), self.dim)
        # a placeholder: the self-influence needs every shard's ΦᵀΦ and is written by finish()
        return rows, row_dots(rows, rows)

    def end_shard(self, store: GradientStore, shard: int) -> None:
        if self._gram_sum is None:
            raise RuntimeError("end_shard without begin_shard")
        store.write_transform_part(GRAM, shard, self._gram_sum.cpu().numpy())
        weights = torch.cat(self._weights).numpy().astype(np.float32) if self._weights else np.zeros(0, np.float32)
        store.write_transform_part(OUT_TO_LOSS, shard, weights)
        self._gram_sum, self._weights = None, []

    def finish(self, store: GradientStore) -> None:
        finish_trak(store, self.options["damping"])

    # ---- query stages -----------------------------------------------------------------------
    def attach(self, store: GradientStore) -> None:
        if store.complete:
            self._inverse = GramInverse(store.read_transform(GRAM))

    def gram_inverse(self, gram: np.ndarray) -> None:
        """Use this ΦᵀΦ (``[C, k, k]``) for queries instead of a store's."""
        self._inverse = GramInverse(gram)

    def query_vectors(self, batch: Any) -> Tensor:
        """collated batch of B queries -> [B, C·k]: (1/C)[(Φ_cᵀΦ_c + λI)^{-1} φ_c(q)]_c."""
        if self._inverse is None:
            raise IncompleteStoreError(
                "TRAK queries need the store's ΦᵀΦ, written when its build completes; finish it with resume=True"
            )
        inverses = self._inverse.matrices(self.query_settings["damping"]).to(self.device)
        phi, _ = self.features(batch)
        vectors = torch.einsum("cij,bcj->bci", inverses, phi.double()) / self.n_checkpoints
        return vectors.reshape(len(phi), self.dim).float()
