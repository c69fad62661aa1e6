"""The store's fault-injection seam: every disk-changing step and every named crash point passes through here.

Every change gradindex makes to a store goes through ``_atomic`` (local disk) or ``_remote`` (object stores),
and each of their steps (mkdir, open, write, fsync, link, rename, fsync of the folder, unlink, put) calls
``step(name, path)`` first. ``inject_io_errors`` hooks that seam to fail a chosen step::

    with inject_io_errors(fail_at=7, code=errno.ENOSPC) as faults:
        gradindex.build(...)          # the 7th step raises OSError(ENOSPC) -> StoreWriteError
    faults.count                      # steps seen; run once with fail_at=None to count them

``crash_point(name)`` stops the process abruptly (exit 137) where ``GRADINDEX_CRASH_AT`` names it. Both are for
the reliability tests and benchmarks; a build without them set runs the steps unhooked.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["IOFaults", "crash_point", "inject_io_errors", "step"]

# called as hook(step, path) before every step that changes the disk
_fault_hook: Callable[[str, Path], None] | None = None
_crash_counts: dict[str, int] = {}


def step(name: str, path: Path) -> None:
    """A disk-changing step is about to run (the hook may raise the OSError a failing disk would)."""
    if _fault_hook is not None:
        _fault_hook(name, path)


def _die() -> None:
    os._exit(137)


def crash_point(name: str) -> None:
    """Exit abruptly at a named point when GRADINDEX_CRASH_AT names it: fault-injection tests use this.

    ``GRADINDEX_CRASH_AT=shard-after-record`` exits the first time the point is reached;
    ``GRADINDEX_CRASH_AT=shard-after-record:3`` the third time.
    """
    spec = os.environ.get("GRADINDEX_CRASH_AT")
    if not spec:
        return
    site, _, nth = spec.partition(":")
    if site != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] >= int(nth or 1):
        _die()


class IOFaults:
    """Counts steps; raises ``OSError(code)`` at step number ``fail_at`` (1-based) and, if ``sticky``, after it."""

    def __init__(self, fail_at: int | None = None, code: int = errno.EIO, *, sticky: bool = False):
        self.fail_at = fail_at
        self.code = code
        self.sticky = sticky
        self.count = 0
        self.steps: list[tuple[str, str]] = []
        self.failed: tuple[str, str] | None = None

    def __call__(self, step: str, path: Path) -> None:
        self.count += 1
        self.steps.append((step, str(path)))
        if self.fail_at is not None and (self.count == self.fail_at or (self.sticky and self.count > self.fail_at)):
            self.failed = (step, str(path))
            raise OSError(self.code, os.strerror(self.code), str(path))


@contextlib.contextmanager
def inject_io_errors(fail_at: int | None = None, code: int = errno.EIO, *, sticky: bool = False) -> Iterator[IOFaults]:
    """Within the block, the store's ``fail_at``-th disk-changing step raises ``OSError(code)``."""
    faults = IOFaults(fail_at, code, sticky=sticky)
    global _fault_hook
    previous = _fault_hook
    _fault_hook = faults
    try:
        yield faults
    finally:
        _fault_hook = previous
