"""Processes on this host: whether a writer that named its pid is still alive."""

from __future__ import annotations

import hashlib
import os
import socket

__all__ = ["HOST_TAG", "pid_alive"]

# this host, as temporary and claim file names carry it (8 hex digits of a hash of the host name)
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
