"""Exact top-k over a whole store: in memory when it fits the budget, else streamed in blocks that fit it (whole
shards, or pieces of shards when the budget is smaller than a shard); or through a persisted approximate index, or
Dask workers. Rows the build left out (``--nonfinite skip``) are never returned."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import IncompatibleStoreError, IncompleteStoreError
from gradindex.search._config import check_search_options
from gradindex.search._dask import search_store_dask
from gradindex.search._exact import ExactIndex, search_blocks
from gradindex.search._persisted import search_index, search_index_dask
from gradindex.search._prefetch import (
    StreamPlan,
    in_memory_bytes,
    least_bytes,
    prefetch_blocks,
    stream_plan,
    to_float32,
)
from gradindex.store import GradientStore, as_store
from gradindex.utils import check_positive_int, default_memory_budget, page_array, track

__all__ = ["least_memory_budget", "search_store", "streaming_plan"]


def search_store(
    store: GradientStore | str | Path,
    queries: np.ndarray,
    k: int,
    *,
    opponents: bool = False,
    memory_budget: int | None = None,
    allow_incomplete: bool = False,
    use_gpu: bool | None = None,
    progress: bool | None = None,
    index: str | None = None,
    nprobe: int | None = None,
    dask: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product search of ``queries [q, D]`` over the store: ``(scores [q, k'], rows [q, k'])``.

    Exact by default: in memory when the store fits ``memory_budget`` bytes (as float32, with one shard being read),
    else streamed with the same answers, in blocks that keep what the search holds within ``memory_budget``: whole
    shards read ahead in a thread, or pieces of shards when the budget is smaller (each shard file still checked
    whole, over the bytes as they are read, before anything is answered). Opponents are the top-k of the negated
    queries; their scores are reported as the true (negative) influence. Rows the build left out
    (``nonfinite="skip"``) are never returned.

    Args:
        store: the store: a path, an fsspec URL or an opened ``GradientStore``.
        queries: ``[q, D]`` query vectors (``D`` the store's dimension), e.g. from the store's featurizer.
        k: results per query.
        opponents: the k most negative scores instead of the k most positive.
        memory_budget: bytes the search may hold (the vectors it reads and their float32 copies, the top-k, faiss's
            scratch); default a quarter of memory, at most 8 GiB.
        allow_incomplete: search the finished shards of a store whose build has not completed.
        use_gpu: search with faiss on GPUs (default: when faiss has them).
        progress: show progress bars (default: when stderr is a terminal).
        index: search the persisted approximate index of this name (``build_index``) instead; rows not found are -1.
        nprobe: with ``index``, IVF lists probed (HNSW: efSearch); default: the index's own.
        dask: spread the search over Dask workers: a scheduler address, ``"local:N"`` or a
            ``distributed.Client``, each worker holding some of the shards (with ``index``: their rows' entries of
            the IVF index's lists).

    Returns:
        ``(scores [q, k'], rows [q, k'])``, best first; ``k' = min(k, rows searched)``.
    """
    store = as_store(store)
    k = check_positive_int("k", k)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != store.dim:
        raise IncompatibleStoreError(
            f"queries have shape {list(queries.shape)} but store {store.path} holds vectors of dimension {store.dim}"
        )
    check_search_options(index, nprobe, dask)
    if index is not None and dask is not None:  # the index's lists spread over the workers
        return _dropping_skipped(
            store,
            allow_incomplete,
            k,
            opponents,
            lambda wanted: search_index_dask(store, queries, wanted, index, dask, nprobe=nprobe, opponents=opponents),
        )
    if index is not None:
        return _dropping_skipped(
            store,
            allow_incomplete,
            k,
            opponents,
            lambda wanted: search_index(
                store, queries, wanted, index, nprobe=nprobe, opponents=opponents, use_gpu=use_gpu
            ),
        )
    if dask is not None:
        return _dropping_skipped(
            store,
            allow_incomplete,
            k,
            opponents,
            lambda wanted: search_store_dask(
                store,
                queries,
                wanted,
                dask,
                opponents=opponents,
                memory_budget=memory_budget,
                allow_incomplete=allow_incomplete,
            ),
        )
    searched = -queries if opponents else queries
    budget = default_memory_budget() if memory_budget is None else memory_budget
    store._require_readable(allow_incomplete)
    skipped = store.skipped_rows(allow_incomplete=allow_incomplete)  # --nonfinite skip: never returned
    itemsize = np.dtype(store.dtype).itemsize
    shape = (store.dim, itemsize, store.layout.rows_per_shard, len(queries), k)
    if in_memory_bytes(store.n_samples, *shape) <= budget:
        index = ExactIndex(store.dim, use_gpu=use_gpu)
        index.reserve(store.n_samples)
        for first_row, block in _blocks(store, allow_incomplete, progress, "load", skipped):
            if first_row != index.ntotal:  # holes (unfinished shards) must not shift row numbers: stream instead
                index = None  # (freed before streaming)
                break
            index.add(block)
        if index is not None:
            scores, rows = index.search(searched, k)
            return (-scores if opponents else scores), _store_rows(rows, skipped)
    return _streamed(store, searched, k, allow_incomplete, use_gpu, opponents, progress, skipped, budget=budget)


def _dropping_skipped(
    store: GradientStore, allow_incomplete: bool, k: int, opponents: bool, search
) -> tuple[np.ndarray, np.ndarray]:
    """``search(k)`` for searches that see every stored row (an index, Dask workers): ask for k more per
    skipped row (``--nonfinite skip``) and leave those out. Missing places are row -1, score -inf (+inf for
    opponents)."""
    try:
        skipped = store.skipped_rows(allow_incomplete=allow_incomplete)
    except IncompleteStoreError:
        skipped = np.zeros(0, np.int64)  # the search itself says the store is incomplete
    if not skipped.size:
        return search(k)
    scores, rows = search(k + len(skipped))
    keep = (rows >= 0) & ~np.isin(rows, skipped)
    width = min(k, int(keep.sum(axis=1).max(initial=0)))
    kept_scores = np.full((rows.shape[0], width), np.inf if opponents else -np.inf, dtype=np.float32)
    kept_rows = np.full((rows.shape[0], width), -1, dtype=np.int64)
    for position in range(rows.shape[0]):
        picked = np.flatnonzero(keep[position])[:width]
        kept_scores[position, : len(picked)] = scores[position, picked]
        kept_rows[position, : len(picked)] = rows[position, picked]
    return kept_scores, kept_rows


def _blocks(
    store: GradientStore,
    allow_incomplete: bool,
    progress: bool | None,
    verb: str,
    skipped: np.ndarray | None = None,
    max_rows: int | None = None,
):
    """The store's shards (or pieces of at most ``max_rows`` rows) in row order, with a rows/s bar; without the
    ``skipped`` rows (then numbered as if they were absent)."""
    blocks = track(
        store.iter_blocks(allow_incomplete=allow_incomplete, max_rows=max_rows),
        store.n_samples,
        f"{verb} {store.path.name}",
        enabled=progress,
        unit="row",
        size=lambda item: len(item[1]),
    )
    return blocks if skipped is None or not skipped.size else _without_rows(blocks, skipped)


def _without_rows(blocks, skipped: np.ndarray):
    """Blocks with the ``skipped`` rows taken out; row r is renumbered r - (skipped rows before r), so rows stay
    consecutive."""
    for first_row, block in blocks:
        low, high = np.searchsorted(skipped, [first_row, first_row + len(block)])
        if high > low:
            block = np.delete(block, skipped[low:high] - first_row, axis=0)
        yield first_row - int(low), block
        del block


def _store_rows(rows: np.ndarray, skipped: np.ndarray) -> np.ndarray:
    """Store rows of rows numbered without the ``skipped`` ones (the inverse of ``_without_rows``)."""
    if not skipped.size:
        return rows
    return rows + np.searchsorted(skipped - np.arange(len(skipped)), rows, side="right")


def _streamed(store, searched, k, allow_incomplete, use_gpu, opponents, progress=None, skipped=None, budget=0):
    # blocks as large as the budget allows (at most a shard), read ahead in a thread beside the one being searched
    plan = streaming_plan(store, len(searched), k, budget)
    max_rows = plan.block_rows if plan.block_rows < store.layout.rows_per_shard else None
    blocks = prefetch_blocks(
        _blocks(store, allow_incomplete, progress, "search", skipped, max_rows), plan.depth, convert=_float32
    )
    scores, rows = search_blocks(blocks, searched, k, use_gpu=use_gpu)
    return (-scores if opponents else scores), _store_rows(rows, np.zeros(0, np.int64) if skipped is None else skipped)


def streaming_plan(store: GradientStore, n_queries: int, k: int, memory_budget: int) -> StreamPlan:
    """How a streamed exact search of ``n_queries`` queries over ``store`` reads it within ``memory_budget`` bytes:
    ``StreamPlan(block_rows, depth, peak_bytes)`` (``stream_plan`` for this store's shape)."""
    return stream_plan(
        memory_budget,
        dim=store.dim,
        itemsize=np.dtype(store.dtype).itemsize,
        rows_per_shard=store.layout.rows_per_shard,
        n_queries=n_queries,
        k=k,
    )


def least_memory_budget(store: GradientStore | str | Path, n_queries: int, k: int) -> int:
    """The smallest ``memory_budget`` an exact search of ``n_queries`` queries for ``k`` results each can hold over
    ``store`` (streamed in blocks of one row); a smaller one is refused with a ``ResourceLimitError``."""
    store = as_store(store)
    return least_bytes(dim=store.dim, itemsize=np.dtype(store.dtype).itemsize, n_queries=n_queries, k=k)


def _float32(vectors: np.ndarray) -> np.ndarray:
    """A store block as C-contiguous float32: torch casts float16 several times faster than numpy (SIMD, threads)."""
    vectors = np.asarray(vectors)
    if vectors.dtype != np.float16 or not vectors.flags.c_contiguous:
        return to_float32(vectors)
    out = page_array(vectors.shape, np.float32)  # given back to the system when dropped (see page_array)
    import torch  # its float16 -> float32 cast is vectorised and threaded (not a model: search never imports one)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only block: torch only reads it
        torch.from_numpy(out).copy_(torch.from_numpy(vectors))
    return out
