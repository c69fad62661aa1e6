"""The one sha256 of gradindex (of bytes, of a file read in blocks, of an object's canonical JSON) and its one crc32c.

sha256 is the checksum of record (``verify``, repairs, appends); crc32c, about eight times faster, is what every read
of a shard file checks when its record holds one."""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["Crc32cCheck", "crc32c_bytes", "is_crc32c", "sha256_bytes", "sha256_file", "sha256_json"]

_BLOCK = 1 << 22


def sha256_bytes(data: bytes | memoryview) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Any) -> str:
    """The hex sha256 of a file's bytes, read in 4 MiB blocks; ``FileNotFoundError`` when it is not there.

    ``path`` is a str, a ``Path``, or any path object with ``open("rb")`` (a store's remote path)."""
    digest = hashlib.sha256()
    with path.open("rb") if hasattr(path, "open") else open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """The hex sha256 of ``value`` as JSON with sorted keys (anything JSON cannot say is written with ``str``)."""
    return sha256_bytes(json.dumps(value, sort_keys=True, default=str).encode())


def crc32c_bytes(data: bytes | bytearray | memoryview) -> str:
    """The check of ``data`` that every read of a shard file compares, as 8 lowercase hex digits: the crc32c
    (Castagnoli, at hardware speed) of ``data``'s last four bytes followed by all of ``data``.

    Not the plain crc32c of ``data``: a CRC of a message followed by its own CRC is a constant, so a change to the
    part of a file that ends with its own crc32c (a zarr shard index, at the end of the file) that kept that crc32c
    consistent would leave the plain crc32c of the file unchanged. Leading with the last four bytes makes it change.
    """
    import google_crc32c  # zarr's own dependency; imported here so that importing gradindex stays light

    if isinstance(data, bytes):
        payload: Any = data
    else:  # google_crc32c reads only read-only buffers: a read-only numpy view, not a copy of a bytearray's bytes
        import numpy as np

        payload = np.frombuffer(data, dtype=np.uint8)
        payload.setflags(write=False)
    return f"{google_crc32c.extend(google_crc32c.value(bytes(data[-4:])), payload):08x}"


class Crc32cCheck:
    """``crc32c_bytes`` of a file read in pieces, in order, holding one piece at a time: made from the file's last four
    bytes (read first), then ``update``d with every byte of the file; ``hexdigest()`` then equals
    ``crc32c_bytes(file bytes)``. Its methods mirror ``hashlib``'s, so a sha256 can stand in for it."""

    def __init__(self, last_four: bytes) -> None:
        import google_crc32c

        self._extend = google_crc32c.extend
        self._value = google_crc32c.value(bytes(last_four))

    def update(self, data: bytes) -> None:
        self._value = self._extend(self._value, data)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


def is_crc32c(value: Any) -> bool:
    """Whether ``value`` is a check as ``crc32c_bytes`` writes it."""
    return isinstance(value, str) and len(value) == 8 and all(char in "0123456789abcdef" for char in value)
