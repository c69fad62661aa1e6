"""Read ahead: the next blocks are read, decoded and converted to float32 in a thread while faiss searches.

File reads, hashing, zarr decoding, numpy casts and faiss searches all release the GIL, so a streamed
exact search overlaps reading shard i+1 with searching shard i instead of doing one after the other.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np

__all__ = ["prefetch_blocks", "prefetch_depth", "to_float32"]

_DONE = object()


def prefetch_depth(block_bytes_float32: int, memory_budget: int) -> int:
    """How many blocks may wait ready beside the one being searched (and the one being read) within the budget."""
    if block_bytes_float32 <= 0:
        return 0
    return int(max(0, min(2, memory_budget // block_bytes_float32 - 2)))


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
            yield first_row, convert(vectors)
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
                # cast here, off the searching thread
                if not put((first_row, convert(vectors))):
                    return
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
    finally:
        stop.set()
        thread.join()
