"""Durable, atomic file writes: temporary name, fsync, rename, fsync the directory."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["write_bytes_atomic", "fsync_dir", "TMP_MARK", "crash_point"]

# Every temporary file gradindex writes carries this mark, so a resume can sweep orphans.
TMP_MARK = ".gi-tmp-"


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename inside it survives a power cut (best effort off POSIX)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def crash_point(name: str) -> None:
    """Exit abruptly at a named point when GRADINDEX_CRASH_AT names it: fault-injection tests use this."""
    if os.environ.get("GRADINDEX_CRASH_AT") == name:
        os._exit(137)


def write_bytes_atomic(path: Path, data: bytes | memoryview, *, crash_site: str | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    if crash_site:
        crash_point(crash_site)
    os.replace(tmp, path)
    fsync_dir(path.parent)
