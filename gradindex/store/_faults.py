"""Fault injection for the store's writes: fail the Nth disk-changing step with an OSError.

Every change gradindex makes to a store on disk goes through ``gradindex.store._atomic`` (mkdir,
open, write, fsync, link, rename, fsync of the folder, unlink). ``inject_io_errors`` hooks that seam::

    with inject_io_errors(fail_at=7, code=errno.ENOSPC) as faults:
        gradindex.build(...)          # the 7th step raises OSError(ENOSPC) -> StoreWriteError
    faults.count                      # steps seen; run once with fail_at=None to count them

Used by the reliability tests and benchmarks; it is not part of the public API.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from gradindex.store import _atomic

__all__ = ["IOFaults", "inject_io_errors"]


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
    previous = _atomic._fault_hook
    _atomic._fault_hook = faults
    try:
        yield faults
    finally:
        _atomic._fault_hook = previous
