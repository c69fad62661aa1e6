"""Progress bars for every long step: rate and ETA on a terminal, silent elsewhere.

Every stage that loops over samples, rows or shards reports through ``progress_bar`` so that
``--quiet`` (``progress=False``), non-terminals (``progress=None`` and stderr is not a TTY) and
``TQDM_DISABLE=1`` all silence it the same way::

    with progress_bar(n_rows, "train IVF4096", enabled=progress, unit="row") as bar:
        for block in blocks:
            index.add(block)
            bar.update(len(block))

The library never prints: progress goes to stderr through tqdm, messages through ``logging``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress_bar", "progress_enabled", "track"]

T = TypeVar("T")


def progress_enabled(enabled: bool | None) -> bool:
    """``True``/``False`` as given; ``None`` means "only when stderr is a terminal"."""
    if enabled is not None:
        return bool(enabled)
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return False


def progress_bar(
    total: int | None, desc: str, *, enabled: bool | None = None, unit: str = "sample", leave: bool = False
):
    """A tqdm bar over ``total`` units showing units/s and the ETA; disabled (and nearly free) when quiet.

    Use it as a context manager, or call ``close()``. ``bar.set_postfix_str("shard 3/10")`` shows the
    current step. No colour is ever used, so ``NO_COLOR`` terminals see plain text; ``TQDM_DISABLE=1``
    turns every bar off (for logs).
    """
    from tqdm.auto import tqdm

    disable = not progress_enabled(enabled) or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, leave=leave, file=sys.stderr)


def track(
    items: Iterable[T], total: int | None, desc: str, *, enabled: bool | None = None, unit: str = "sample", size=len
) -> Iterator[T]:
    """Yield ``items`` while advancing a bar by ``size(item)`` per item (e.g. rows per block)."""
    with progress_bar(total, desc, enabled=enabled, unit=unit) as bar:
        for item in items:
            yield item
            bar.update(size(item))
            del item  # not held while the next one is made (a budget counts a block once)
