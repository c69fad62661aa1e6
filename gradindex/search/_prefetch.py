"""Read ahead: the next blocks are read, decoded and converted to float32 in a thread while faiss searches; and
how large those blocks may be within a memory budget.

File reads, hashing, zarr decoding, numpy casts and faiss searches all release the GIL, so a streamed
exact search overlaps reading block i+1 with searching block i instead of doing one after the other.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np

from gradindex.errors import ResourceLimitError
from gradindex.utils import format_bytes

__all__ = ["StreamPlan", "in_memory_bytes", "least_bytes", "prefetch_blocks", "stream_plan", "to_float32"]

# faiss's exact inner-product search multiplies blocks of up to 4096 queries by 1024 rows through BLAS (its
# distance_compute_blas_query_bs and _database_bs), in a float32 scratch of that size
_FAISS_QUERY_BLOCK, _FAISS_ROW_BLOCK = 4096, 1024
# the read-ahead thread, the reader's 1 MiB reads of a shard file's tail, the allocator's slack: measured 2.5 MiB over
# the blocks' bytes whatever their size (benchmarks/memory_budget, blocks of 120 to 17,000 rows)
_MACHINERY_BYTES = 4 << 20


class StreamPlan(NamedTuple):
    """How a streamed exact search reads the store: blocks of ``block_rows`` rows (a whole shard or less), ``depth``
    of them read ahead, and the bytes that holds at most (``peak_bytes``)."""

    block_rows: int
    depth: int
    peak_bytes: int


def _fixed_bytes(dim: int, n_queries: int, k: int) -> int:
    """What a search holds whatever the block size: a float32 copy of the queries (negated for opponents), the top-k
    heap and one block's top-k (scores float32 and rows int64), faiss's BLAS scratch, and the machinery's allowance."""
    scratch = min(n_queries, _FAISS_QUERY_BLOCK) * _FAISS_ROW_BLOCK * 4
    return n_queries * dim * 4 + 2 * n_queries * k * 12 + scratch + _MACHINERY_BYTES


def _row_bytes(dim: int, itemsize: int, depth: int) -> int:
    """Bytes per block row: the block being read (as stored, then float32), ``depth`` ready as float32, the one being
    searched (float32 and its finiteness check, a byte per value). A whole shard is read as one file and decoded into
    a copy (twice its stored bytes), which for float16 and float32 alike is no more than stored + float32."""
    return dim * (itemsize + 4 * (depth + 2) + 1)


def in_memory_bytes(n_rows: int, dim: int, itemsize: int, rows_per_shard: int, n_queries: int, k: int) -> int:
    """Bytes an in-memory exact search holds: every row as float32 in the index, one shard being read into it (stored
    bytes, a decoded copy, its float32 conversion and finiteness check), and what any search holds."""
    shard_bytes = min(rows_per_shard, n_rows) * dim * (2 * itemsize + 4 + 1)
    return n_rows * dim * 4 + shard_bytes + _fixed_bytes(dim, n_queries, k)


def least_bytes(*, dim: int, itemsize: int, n_queries: int, k: int) -> int:
    """The smallest budget a streamed exact search can hold: its fixed part and blocks of one row."""
    return _fixed_bytes(dim, n_queries, k) + _row_bytes(dim, itemsize, 1)


def stream_plan(
    memory_budget: int, *, dim: int, itemsize: int, rows_per_shard: int, n_queries: int, k: int
) -> StreamPlan:
    """The largest blocks (at most a shard) a streamed exact search can read within ``memory_budget`` bytes: whole
    shards with two, else one, read ahead; else blocks smaller than a shard with one read ahead.

    Args:
        memory_budget: bytes the search may hold (the vectors it reads, their float32 copies, faiss's scratch).
        dim: the vectors' dimension.
        itemsize: bytes per stored value (2 for float16, 4 for float32).
        rows_per_shard: rows of the store's shards.
        n_queries: the queries searched.
        k: results per query.

    Returns:
        A ``StreamPlan``.

    Raises:
        ResourceLimitError: the budget cannot hold the search's fixed part and one row.
    """
    fixed = _fixed_bytes(dim, n_queries, k)
    room = memory_budget - fixed
    for depth in (2, 1):
        if rows_per_shard * _row_bytes(dim, itemsize, depth) <= room:
            return StreamPlan(rows_per_shard, depth, fixed + rows_per_shard * _row_bytes(dim, itemsize, depth))
    rows = room // _row_bytes(dim, itemsize, 1)
    if rows < 1:
        least = least_bytes(dim=dim, itemsize=itemsize, n_queries=n_queries, k=k)
        raise ResourceLimitError(
            f"exact search of {n_queries} queries (k={k}) holds at least {format_bytes(least)} (the queries, their "
            f"top-k and faiss's scratch, and one row of dimension {dim}), more than memory_budget={memory_budget} "
            f"({format_bytes(memory_budget)}); give a budget of at least {least} bytes, or search fewer queries at "
            "a time"
        )
    return StreamPlan(int(rows), 1, fixed + int(rows) * _row_bytes(dim, itemsize, 1))


_DONE = object()


def to_float32(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` as C-contiguous float32 (float64 beyond float32's range becomes inf, which search reports)."""
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(vectors, dtype=np.float32)


def prefetch_blocks(
    blocks: Iterable[tuple[int, np.ndarray]], depth: int, convert: Callable[[np.ndarray], np.ndarray] = to_float32
) -> Iterator[tuple[int, np.ndarray]]:
    """``blocks`` as ``(first_row, convert(vectors))`` (float32 C-contiguous, which search_blocks takes uncopied),
    produced up to ``depth`` blocks ahead by a thread. ``depth=0`` reads and converts in the caller's thread
    (no read-ahead, nothing extra held). Errors raised while reading come out of this iterator at the block
    where they happened."""
    if depth <= 0:
        for first_row, vectors in blocks:
            converted = convert(vectors)
            del vectors
            yield first_row, converted
            del converted
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for first_row, vectors in blocks:
                # cast here, off the searching thread; neither block is held while the next one is read
                item = (first_row, convert(vectors))
                del vectors
                if not put(item):
                    return
                del item
        except BaseException as error:  # handed to the consumer, raised there
            put((_DONE, error))
            return
        put((_DONE, None))

    thread = threading.Thread(target=produce, name="gradindex-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            first_row, payload = ready.get()
            if first_row is _DONE:
                if payload is not None:
                    raise payload
                return
            yield first_row, payload
            del payload  # not held while waiting for the next block
    finally:
        stop.set()
        thread.join()
