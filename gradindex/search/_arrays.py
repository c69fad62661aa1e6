"""Checking and converting the arrays handed to the index: shapes, dtypes, finiteness, float32."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from gradindex.errors import NonFiniteError

__all__: list[str] = []

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

# Conversions to float32 go through a buffer of at most this many bytes, so adding a large float16
# array never holds a second full-size float32 copy beside the one faiss keeps.
CHUNK_BYTES = 64 << 20


def as_matrix(array: Any, what: str, dim: int | None = None, dim_owner: str = "the index has") -> np.ndarray:
    """``array`` as a 2-D float16/32/64 numpy array ``[n, dim]`` (not copied), else ValueError naming ``what``.

    ``what`` is a plural noun ("queries"); ``dim_owner`` ends in its verb ("the index has").
    """
    matrix = np.asarray(array)
    if matrix.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [rows, dim], got shape {tuple(matrix.shape)}")
    if matrix.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what} must be float16, float32 or float64, got {matrix.dtype}")
    if dim is not None and matrix.shape[1] != dim:
        raise ValueError(f"{what} have dimension {matrix.shape[1]} but {dim_owner} dimension {dim}")
    return matrix


def row_chunks(n_rows: int, dim: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges covering ``n_rows`` rows, each at most CHUNK_BYTES as float32."""
    step = max(1, CHUNK_BYTES // (4 * max(dim, 1)))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


class Float32Buffer:
    """A growable float32 scratch array, reused so that repeated conversions do not allocate."""

    def __init__(self) -> None:
        self._data = np.empty(0, dtype=np.float32)

    def float32(self, matrix: np.ndarray) -> np.ndarray:
        """``matrix`` as C-contiguous float32: itself when it already is, else a view of the buffer
        (valid until the next call)."""
        if matrix.dtype == np.float32 and matrix.flags.c_contiguous:
            return matrix
        n_rows, dim = matrix.shape
        if self._data.size < n_rows * dim:
            self._data = np.empty(n_rows * dim, dtype=np.float32)
        converted = self._data[: n_rows * dim].reshape(n_rows, dim)
        # float64 beyond float32's range becomes inf here; the finiteness check reports it
        with np.errstate(over="ignore"):
            np.copyto(converted, matrix, casting="same_kind")
        return converted


def check_finite(matrix: np.ndarray, what: str, buffer: Float32Buffer, first_row: int = 0) -> None:
    """Raise NonFiniteError if any row of ``matrix`` is NaN or inf once converted to float32.

    faiss does not check: a NaN score compares false against everything, so such rows silently take
    or lose places in the top-k. The check runs chunk by chunk through ``buffer``; row numbers in the
    message start at ``first_row``.
    """
    n_bad, first_bad = 0, -1
    for start, stop in row_chunks(matrix.shape[0], matrix.shape[1]):
        finite = np.isfinite(buffer.float32(matrix[start:stop]))
        if finite.all():  # the common case, without a per-row reduction
            continue
        bad = ~finite.all(axis=1)
        if bad.any():
            if first_bad < 0:
                first_bad = start + int(np.argmax(bad))
            n_bad += int(bad.sum())
    if n_bad:
        raise NonFiniteError(
            f"{n_bad} of {matrix.shape[0]} {what} hold NaN or infinite values as float32 (the first is row "
            f"{first_row + first_bad}); faiss cannot rank them. Fix or drop those rows, or rescale values "
            "beyond float32's range."
        )


def without_rows(scores: np.ndarray, rows: np.ndarray, dropped: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's results without the ``dropped`` rows, cut to ``k`` (searched for ``k + len(dropped)``)."""
    if not len(dropped):
        return scores[:, :k], rows[:, :k]
    keep = ~np.isin(rows, dropped)
    width = min(k, int(keep.sum(axis=1).min()) if len(rows) else k)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :width]  # kept entries first, in their order
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)
