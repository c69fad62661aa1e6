"""A shard's features file made as its rows arrive: each block of rows is cast into the file's bytes, checked and
hashed at once, so a build hands its writer a finished file instead of a float32 shard to pass over three more times
(cast, checks, checksums), and that work runs beside the featurization of the next rows."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.store._atomic import AtomicFile, write_bytes_atomic
from gradindex.store._pieces import chunk_entries
from gradindex.store._remote import is_remote
from gradindex.utils import Crc32cCheck, crc32c_bytes, sha256_bytes

__all__ = ["FLOAT16_MAX", "ShardEncoder", "cast_into", "cast_vectors"]

FLOAT16_MAX = 65504.0


def cast_vectors(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` as ``dtype``; float32 → float16 through torch (vectorised, about 10× numpy's cast here), which rounds
    to nearest-even exactly as numpy does, so the bytes are the same."""
    if dtype == "float16" and values.dtype == np.float32 and values.flags.c_contiguous:
        import torch

        return torch.from_numpy(values).to(torch.float16).numpy()
    return values.astype(dtype, copy=False)


def cast_into(destination: np.ndarray, values: Any) -> None:
    """``destination[...] = values`` (a numpy array or a CPU tensor) with ``cast_vectors``'s rounding: float32 through
    torch, anything else by numpy (which rounds float64 to float16 once, where torch would round twice)."""
    import torch

    if isinstance(values, torch.Tensor):
        if values.dtype != torch.float32:
            destination[...] = values.detach().cpu().numpy()
            return
        source = values.detach()
    elif values.dtype == np.float32:
        source = torch.from_numpy(np.ascontiguousarray(values))
    else:
        destination[...] = values
        return
    torch.from_numpy(destination).copy_(source)


def plainly_in_range(values: np.ndarray) -> bool:
    """True when every value is finite and, for float16, clear of its maximum (strictly below 65504 after the cast:
    the value before it was then below 65488); False asks for the exact checks. One pass (torch's aminmax)."""
    if values.size == 0:
        return True
    import torch

    low, high = (float(bound) for bound in torch.aminmax(torch.from_numpy(values)))
    limit = FLOAT16_MAX if values.dtype == np.float16 else float("inf")
    return -limit < low and high < limit  # False for a NaN too


class ShardEncoder:
    """The features file of one shard, ``n_rows`` rows of ``dim`` values, encoded as ``add`` hands it its rows in
    order; ``finish`` then gives its sha256 and crc32c check (``crc32c_bytes``'s), and ``save`` puts it in place.

    ``layout`` is ``(numpy dtype, rows per chunk, chunks per shard file)`` of the plain layout gradindex writes (chunks
    back to back, the last zero-padded, then the chunk index and its crc32c): the rows are cast straight into the
    file's bytes. Given a local ``path`` too, those bytes go to the file's temporary name (beside ``near``, if given)
    as they are made (an ``AtomicFile``), so that when the last rows arrive only their own write and the fsync are
    left; without one (a remote store) they are kept in memory for one PUT. With ``layout`` None (a store whose arrays
    zarr must encode), the rows are kept as float32 and ``encode(values) -> bytes`` makes the file at ``finish``.

    What the store refuses is found on the way, on the rows as given: ``nonfinite_rows`` (offsets in the shard) and
    ``peak``, the largest magnitude when the cast values touched float16's limit (else 0). One thread at a time; an
    encoder that is not saved must be discarded (``discard``), which removes its temporary file.
    """

    def __init__(
        self,
        n_rows: int,
        dim: int,
        dtype: str,
        layout: tuple[str, int, int] | None,
        encode: Callable[[np.ndarray], bytes] | None = None,
        path: Path | None = None,
        near: Path | None = None,
    ) -> None:
        self.n_rows, self.dim, self.dtype = n_rows, dim, dtype
        self.filled = 0
        self.nonfinite_rows: list[int] = []
        self.peak = 0.0
        self._encode = encode
        self._finished: tuple[str, str] | None = None
        self._bytes: Any = None  # the whole file, when it is made in memory
        self._file: AtomicFile | None = None
        self._path, self._near = path, near
        self._streamed = False
        if layout is None:
            self._numpy_dtype = None
            self._stored = np.zeros((n_rows, dim), dtype=np.float32)
            return
        self._numpy_dtype, rows_per_chunk, chunks_per_shard = layout
        n_chunks = -(-n_rows // rows_per_chunk)
        self._row_bytes = dim * np.dtype(self._numpy_dtype).itemsize
        self._rows_end = n_rows * self._row_bytes
        index = np.full(2 * chunks_per_shard, np.iinfo(np.uint64).max, dtype="<u8")  # all ones: no chunk there
        index[: 2 * n_chunks] = chunk_entries(n_chunks, rows_per_chunk * self._row_bytes)
        import google_crc32c  # zarr's own dependency (its crc32c codec: the checksum as a little-endian uint32)

        index_bytes = index.tobytes()
        index_bytes += google_crc32c.value(index_bytes).to_bytes(4, "little")
        # after the rows: the last chunk's zero padding, then the index
        self._tail = bytes(n_chunks * rows_per_chunk * self._row_bytes - self._rows_end) + index_bytes
        self._sha256 = hashlib.sha256()
        self._crc32c = Crc32cCheck(index_bytes[-4:])  # crc32c_bytes's check, which leads with the last 4 bytes
        if path is not None and not is_remote(path):
            self._streamed = True
            self._stored = None
            self._block = np.empty((0, dim), dtype=self._numpy_dtype)  # each add's rows, cast (reused)
        else:
            self._bytes = bytearray(self._rows_end + len(self._tail))
            self._bytes[self._rows_end :] = self._tail
            self._stored = np.frombuffer(self._bytes, dtype=self._numpy_dtype, count=n_rows * dim).reshape(n_rows, dim)

    def add(self, rows: Any) -> None:
        """The next ``[b, dim]`` rows (float numpy array or CPU tensor): cast into place, checked, hashed (and, for a
        local file, written)."""
        count = len(rows)
        if count == 0:
            return
        if self._finished is not None or self.filled + count > self.n_rows or tuple(rows.shape[1:]) != (self.dim,):
            raise ValueError(
                f"a shard of {self.n_rows} rows of {self.dim} values has {self.filled} rows; it cannot take "
                f"{list(rows.shape)} more"
            )
        start = self.filled
        if self._stored is not None:
            destination = self._stored[start : start + count]
        else:
            if len(self._block) < count:
                self._block = np.empty((count, self.dim), dtype=self._numpy_dtype)
            destination = self._block[:count]
        cast_into(destination, rows)
        if self._numpy_dtype is None or not plainly_in_range(destination):  # zarr's case: no cast yet to check cheaply
            self._check_exactly(rows, start)
        if self._numpy_dtype is not None:
            self._hash(destination.reshape(-1).view(np.uint8))
            if self._streamed:
                if self._file is None:
                    self._file = AtomicFile(self._path, self._near)
                self._file.write(memoryview(destination.reshape(-1).view(np.uint8)))
        self.filled += count

    def _check_exactly(self, rows: Any, start: int) -> None:
        values = np.asarray(rows.detach().cpu().numpy() if hasattr(rows, "detach") else rows, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            finite = np.isfinite(values).all(axis=1)
        self.nonfinite_rows.extend((np.flatnonzero(~finite) + start).tolist())
        if self.dtype == "float16" and finite.any():
            self.peak = max(self.peak, float(np.abs(values[finite]).max()))

    def _hash(self, piece: Any) -> None:
        piece = np.frombuffer(piece, dtype=np.uint8)
        piece.setflags(write=False)  # google_crc32c reads only read-only buffers
        self._sha256.update(piece)
        self._crc32c.update(piece)

    def finish(self) -> tuple[str, str]:
        """``(sha256 hex, crc32c check)`` of the file, once every row was added."""
        if self._finished is None:
            if self.filled != self.n_rows:
                raise ValueError(f"a shard of {self.n_rows} rows was given only {self.filled}")
            if self._numpy_dtype is None:
                self._bytes = self._encode(cast_vectors(self._stored, self.dtype))
                self._finished = (sha256_bytes(self._bytes), crc32c_bytes(self._bytes))
            else:
                self._hash(self._tail)
                if self._streamed:
                    if self._file is None:
                        self._file = AtomicFile(self._path, self._near)
                    self._file.write(self._tail)
                self._finished = (self._sha256.hexdigest(), self._crc32c.hexdigest())
        return self._finished

    def rows(self, offsets: Any) -> np.ndarray:
        """The stored values of rows ``offsets`` (offsets in the shard), as the file holds them."""
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
        if self._stored is not None:
            return self._stored[offsets]
        if self._file is None:
            return np.zeros((len(offsets), self.dim), dtype=self._numpy_dtype)
        data = self._file.read([int(offset) * self._row_bytes for offset in offsets], self._row_bytes)
        return np.frombuffer(data, dtype=self._numpy_dtype).reshape(len(offsets), self.dim)

    def save(self, path: Path, *, crash_site: str | None = None) -> None:
        """Put the finished file at ``path`` atomically (``write_bytes_atomic``'s steps; the file streamed to its
        temporary name is fsynced and renamed)."""
        self.finish()
        if not self._streamed:
            write_bytes_atomic(path, self._bytes, crash_site=crash_site)
            return
        if Path(path) != Path(self._path):
            raise ValueError(f"this encoder writes {self._path}, not {path}")
        self._file.commit(crash_site=crash_site)

    def discard(self) -> None:
        """Drop an unsaved file's temporary name (nothing to do once saved)."""
        if self._file is not None:
            self._file.discard()
