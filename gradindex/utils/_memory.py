"""How much memory a step may hold: the default budgets, what the machine has, and the one check that refuses a
setting whose working memory cannot fit before anything is allocated."""

from __future__ import annotations

import mmap
import os

import numpy as np

from gradindex.errors import ResourceLimitError

__all__ = ["available_memory", "check_fits", "default_memory_budget", "format_bytes", "page_array"]


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_memory_budget() -> int:
    """A quarter of physical memory, at most 8 GiB: what in-memory search (or an index's training sample) may hold."""
    return int(min(8 << 30, _physical_memory() // 4))


def available_memory() -> int:
    """Bytes the machine can give now (MemAvailable on Linux; elsewhere the physical memory)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return _physical_memory()


def format_bytes(count: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: bytes for a message."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def check_fits(what: str, needed: int, limit: int, limit_name: str, fix: str) -> None:
    """Refuse ``what`` when it ``needed`` more bytes than ``limit`` (``limit_name`` says which limit): a
    ``ResourceLimitError`` with both numbers and ``fix``. The machine's available memory caps every limit."""
    physical = available_memory()
    if limit > physical:
        limit, limit_name = physical, "the memory this machine has available"
    if needed > limit:
        raise ResourceLimitError(
            f"{what} needs {format_bytes(needed)}, more than {limit_name} ({format_bytes(limit)}); {fix}"
        )


def page_array(shape: int | tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
    """An uninitialised array in memory of its own (an anonymous mapping), given back to the system as soon as the
    array is dropped. Blocks that a budget bounds are made this way: glibc keeps freed blocks below its sliding mmap
    threshold (which grows to 32 MiB) for reuse, and blocks made by one thread (a read-ahead) and freed by another
    then pile up in its arenas beyond what is live; measured, a 64 MiB budget peaked 30 MiB over through that alone.
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if count * dtype.itemsize == 0:
        return np.empty(shape, dtype=dtype)
    return np.frombuffer(mmap.mmap(-1, count * dtype.itemsize), dtype=dtype, count=count).reshape(shape)
