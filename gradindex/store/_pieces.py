"""Reading a shard file of the plain layout in pieces of rows (for reads within a memory budget smaller than a shard):
the check that its chunks lie back to back from the file's start (and the index entries that say so), and exact
reads."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["chunk_entries", "plain_index", "read_exactly", "read_into"]


def chunk_entries(n_chunks: int, chunk_bytes: int) -> np.ndarray:
    """The first ``2 * n_chunks`` entries of a plain-layout shard index as gradindex writes it: each chunk's
    (offset, nbytes) as little-endian uint64, the chunks back to back from the file's start."""
    entries = np.empty(2 * n_chunks, dtype="<u8")
    entries[0::2] = np.arange(n_chunks, dtype=np.uint64) * chunk_bytes
    entries[1::2] = chunk_bytes
    return entries


def plain_index(index: bytes, n_rows: int, rows_per_chunk: int, row_bytes: int) -> bool:
    """Whether a plain-layout shard index (read from the file's end) puts the chunks ``n_rows`` rows need back to back
    from the file's start, as gradindex writes them (what ``_plain_decode`` checks of a file read whole)."""
    n_chunks = -(-n_rows // rows_per_chunk)
    if len(index) < 16 * n_chunks + 4:
        return False
    offsets = np.frombuffer(index, dtype="<u8", count=2 * n_chunks)
    return bool(np.array_equal(offsets, chunk_entries(n_chunks, rows_per_chunk * row_bytes)))


def read_exactly(handle: Any, size: int) -> bytes:
    """``size`` bytes from ``handle``'s position; ``EOFError`` when the file ends first (it shrank under us)."""
    data = handle.read(size)
    while len(data) < size:
        more = handle.read(size - len(data))
        if not more:
            raise EOFError(f"the file ended {size - len(data)} bytes before the {size} asked for")
        data += more
    return data


def read_into(handle: Any, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (a C-contiguous array) with the next bytes of ``handle``; ``EOFError`` when the file ends first."""
    view = memoryview(out).cast("B")
    filled = 0
    while filled < len(view):
        count = handle.readinto(view[filled:])
        if not count:
            raise EOFError(f"the file ended {len(view) - filled} bytes before the {len(view)} asked for")
        filled += count
    return out
