"""How much memory a step may hold when the caller does not say."""

from __future__ import annotations

import os

__all__ = ["default_memory_budget"]


def default_memory_budget() -> int:
    """A quarter of physical memory, at most 8 GiB: what in-memory search (or an index's training sample) may hold."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return int(min(8 << 30, total // 4))
