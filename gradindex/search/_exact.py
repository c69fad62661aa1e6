"""Exact inner-product top-k search: in memory (ExactIndex) or streamed block by block (search_blocks)."""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable
from typing import Any

import numpy as np

from gradindex.errors import NonFiniteError, SearchError
from gradindex.search._arrays import Float32Buffer, as_matrix, check_finite, row_chunks
from gradindex.search._faiss import (
    GPU_MAX_K,
    ensure_configured,
    faiss_errors,
    gpu_resources,
    resolve_gpus,
    to_gpus,
)
from gradindex.utils import check_positive_int

__all__ = ["ExactIndex", "search_blocks"]


class ExactIndex:
    """Exact inner-product search over vectors held in memory.

    On all GPUs, rows sharded across them, when faiss has GPUs and ``use_gpu`` is not False;
    else on CPU (faiss ``IndexFlatIP``). Rows are numbered in the order they are added::

        index = ExactIndex(1024)
        index.add(vectors)                    # [n, 1024]
        scores, rows = index.search(queries, k=10)
    """

    def __init__(self, dim: int, *, use_gpu: bool | None = None) -> None:
        import faiss

        self._dim = check_positive_int("dim", dim)
        ensure_configured()
        n_gpus = resolve_gpus(use_gpu)
        # The CPU index is the one copy that add() appends to, also when searching on GPU: a faiss
        # index sharded over several GPUs accepts only a single add() (IndexShards with successive
        # ids), so the GPU copy is re-made from this one whenever rows were added since.
        self._cpu_index = faiss.IndexFlatIP(self._dim)
        self._gpu_resources = gpu_resources(n_gpus) if n_gpus else []
        self._gpu_index: Any = None
        self._gpu_ntotal = 0
        self._buffer = Float32Buffer()

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        """The number of rows added."""
        return int(self._cpu_index.ntotal)

    @property
    def on_gpu(self) -> bool:
        return bool(self._gpu_resources)

    def __repr__(self) -> str:
        return f"ExactIndex(dim={self._dim}, ntotal={self.ntotal}, on_gpu={self.on_gpu})"

    def reserve(self, n_rows: int) -> None:
        """Make room for ``n_rows`` rows in all, so that adding them block by block never moves the rows already
        added (each growth of faiss's storage copies it: blocks added without this cost about twice one add)."""
        codes = self._cpu_index.codes
        wanted = check_positive_int("n_rows", n_rows) * self._dim * 4  # IndexFlatIP keeps float32 rows
        if wanted > codes.size():
            size = codes.size()
            with faiss_errors(f"reserving room for {n_rows} vectors"):
                codes.resize(wanted)
                codes.resize(size)  # the size back; the storage (a std::vector) keeps its capacity

    def add(self, vectors: np.ndarray) -> None:
        """Append ``vectors [n, dim]`` (float16, float32 or float64) as rows ``ntotal .. ntotal + n - 1``.

        Nothing is added if any row is not finite (NonFiniteError).
        """
        import faiss

        vectors = as_matrix(vectors, "vectors", self._dim)
        before = self.ntotal
        # Each chunk is converted to float32 once, checked, then added; a rejected call takes back the rows it added,
        # so that it leaves the index as it was.
        with faiss_errors(f"adding {vectors.shape[0]} vectors to an index of {before}"):
            for start, stop in row_chunks(vectors.shape[0], self._dim):
                converted = self._buffer.float32(vectors[start:stop])
                try:
                    check_finite(converted, "vectors", self._buffer)
                except NonFiniteError:
                    if self.ntotal > before:
                        self._cpu_index.remove_ids(faiss.IDSelectorRange(before, self.ntotal))
                    check_finite(vectors, "vectors", self._buffer)  # says how many rows of the call, and the first
                    raise
                self._cpu_index.add(converted)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product: ``queries [q, dim]`` -> ``(scores [q, k'] float32, rows [q, k'] int64)``.

        ``k' = min(k, ntotal)``; each row of the result is sorted by score, highest first, ties by row.
        """
        k = check_positive_int("k", k)
        queries = as_queries(queries, self._dim, "the index has")
        k_found = min(k, self.ntotal)
        if k_found == 0 or queries.shape[0] == 0:
            return _empty(queries.shape[0], k_found)
        index, where = self._index_for(k_found)
        with faiss_errors(f"searching {queries.shape[0]} queries (k={k_found}) among {self.ntotal} vectors on {where}"):
            scores, rows = index.search(queries, k_found)
        return _finish(scores, rows)

    def _index_for(self, k: int) -> tuple[Any, str]:
        if not self._gpu_resources or k > GPU_MAX_K:
            return self._cpu_index, "CPU"
        if self._gpu_index is None or self._gpu_ntotal != self.ntotal:
            self._gpu_index = None  # free the stale copy before making the new one
            self._gpu_index = to_gpus(self._cpu_index, self._gpu_resources)
            self._gpu_ntotal = self.ntotal
        return self._gpu_index, f"{len(self._gpu_resources)} GPU(s)"


def search_blocks(
    blocks: Iterable[tuple[int, np.ndarray]],
    queries: np.ndarray,
    k: int,
    *,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over vectors that arrive block by block: ``(scores [q, k'] float32, rows [q, k'] int64)``.

    Each block is ``(first_row, vectors [n_i, dim])``: its vectors are rows ``first_row .. first_row + n_i - 1``.
    Blocks may come in any order and rows may be missing (those are never returned); a row may not
    come twice. ``k' = min(k, rows given)``. The result equals ``ExactIndex`` over the same rows, but
    only one block is held at a time (the faiss ``contrib.exhaustive_search`` pattern: search each block with
    ``faiss.knn`` on CPU or one reused flat index on GPU, offset its ids, merge into a ``faiss.ResultHeap``).
    """
    import faiss

    k = check_positive_int("k", k)
    dim = as_matrix(queries, "queries").shape[1]
    queries = as_queries(queries, dim, "the index has")
    n_queries = queries.shape[0]
    ensure_configured()
    n_gpus = resolve_gpus(use_gpu)
    if k > GPU_MAX_K:
        n_gpus = 0  # faiss GPU search cannot select that many results per query
    resources = gpu_resources(n_gpus) if n_gpus else []
    # On CPU each block is searched in place (faiss.knn: BLAS GEMM + top-k, no copy into an index, which
    # would allocate and fill a block-sized buffer per block); on GPU through one reused flat index,
    # empty so that each block's add() is the single add a sharded GPU index allows.
    index = to_gpus(faiss.IndexFlatIP(dim), resources) if resources else None
    where = f"{n_gpus} GPU(s)" if resources else "CPU"
    heap = faiss.ResultHeap(n_queries, k, keep_max=True) if n_queries else None
    buffer = Float32Buffer()
    seen = _RowRanges()
    for first_row, vectors in blocks:
        first_row = _first_row(first_row)
        what = f"rows of the block at row {first_row}"
        vectors = as_matrix(vectors, what, dim, "the queries have")
        n_rows = vectors.shape[0]
        if n_rows == 0:
            continue
        seen.add(first_row, n_rows)
        block = buffer.float32(vectors)
        check_finite(block, what, buffer, first_row)
        if heap is None:
            continue
        # never more than the block holds: faiss pads with row -1, which the offset would turn into a real row
        k_block = min(k, n_rows)
        doing = f"searching {n_queries} queries (k={k_block}) among the {n_rows} vectors at row {first_row} on {where}"
        with faiss_errors(doing):
            if index is None:
                scores, rows = faiss.knn(queries, block, k_block, metric=faiss.METRIC_INNER_PRODUCT)
            else:
                index.add(block)
                try:
                    scores, rows = index.search(queries, k_block)
                finally:
                    index.reset()
        rows += first_row
        heap.add_result(scores, rows)
        del vectors, block  # not held while the next block is read (a memory budget counts each block once)
    k_found = min(k, seen.n_rows)
    if heap is None or k_found == 0:
        return _empty(n_queries, k_found)
    heap.finalize()
    return _finish(heap.D[:, :k_found], heap.I[:, :k_found])


class _RowRanges:
    """The row ranges given so far, to refuse a row that comes twice (it would be ranked twice)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        self.n_rows = 0

    def add(self, first_row: int, n_rows: int) -> None:
        stop = first_row + n_rows
        position = bisect.bisect_right(self._starts, first_row)
        before = position - 1
        if (before >= 0 and self._stops[before] > first_row) or (
            position < len(self._starts) and self._starts[position] < stop
        ):
            raise ValueError(
                f"the block at row {first_row} ({n_rows} rows) overlaps rows given by an earlier block; "
                "each row must come in exactly one block"
            )
        self._starts.insert(position, first_row)
        self._stops.insert(position, stop)
        self.n_rows += n_rows


def _first_row(value: Any) -> int:
    try:
        first_row = operator.index(value)
    except TypeError:
        first_row = -1
    if isinstance(value, bool) or first_row < 0:
        raise ValueError(f"a block's first row must be a non-negative integer, got {value!r}")
    return first_row


def as_queries(queries: Any, dim: int, dim_owner: str) -> np.ndarray:
    queries = as_matrix(queries, "queries", dim, dim_owner)
    # queries are few next to the index rows: a fresh float32 copy is simpler than sharing a buffer
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, which check_finite reports
        queries = np.ascontiguousarray(queries, dtype=np.float32)
    check_finite(queries, "queries", Float32Buffer())
    return queries


def _empty(n_queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty((n_queries, k), dtype=np.float32), np.empty((n_queries, k), dtype=np.int64)


def _finish(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check faiss's answer and put equal scores in row order, so ties read the same on CPU, GPU and blocks."""
    if (rows < 0).any() or not np.isfinite(scores).all():
        # With finite inputs this means inner products overflowed float32: faiss then returns inf
        # scores, or leaves slots empty (row -1) because -inf never beats its floor of -FLT_MAX.
        raise SearchError(
            "some inner products overflow float32 (|score| > 3.4e38), so faiss cannot rank them; "
            "rescale the vectors or the queries."
        )
    order = np.lexsort((rows, -scores), axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    rows = np.take_along_axis(rows, order, axis=1)
    return np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(rows, dtype=np.int64)
