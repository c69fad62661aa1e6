"""Arrow arrays made from numpy, and read back, without pyarrow's pandas shim: ``pa.array`` and ``to_numpy`` import
pandas wherever it is installed, a quarter of a second of the first build or query a process makes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["arrow_of", "numpy_of"]


def numpy_of(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An Arrow array's values in numpy: numbers without nulls straight from their buffers, anything else converted."""
    if isinstance(array, pa.ChunkedArray):
        chunks = [numpy_of(chunk) for chunk in array.chunks]
        if chunks:
            return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        return np.empty(0, dtype=_numpy_dtype(array.type) or object)
    dtype = _numpy_dtype(array.type)
    if dtype is not None and array.null_count == 0:
        return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)
    return array.to_numpy(zero_copy_only=False)


def arrow_of(values: np.ndarray | Sequence[Any], type: pa.DataType | None = None) -> pa.Array:
    """``pa.array(values, type)`` for a 1-D numpy array of numbers or booleans, or strings (a numpy unicode array or
    a sequence of ``str``), made from their buffers; anything else through ``pa.array``."""
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "iuf" and type is None:
        values = np.ascontiguousarray(values)
        return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind == "b" and type is None:
        bits = np.packbits(values, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])
    strings = values.tolist() if isinstance(values, np.ndarray) and values.dtype.kind == "U" else values
    if (type is None or type == pa.string()) and all(isinstance(value, str) for value in strings):
        encoded = [value.encode() for value in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(value) for value in encoded], out=offsets[1:])
        if offsets[-1] < 2**31:  # pa.string()'s 32-bit offsets
            return pa.Array.from_buffers(
                pa.string(),
                len(encoded),
                [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))],
            )
    return pa.array(values, type)


def _numpy_dtype(type: pa.DataType) -> np.dtype | None:
    """The numpy dtype whose buffer holds an Arrow integer or floating-point array as it is; None for other types."""
    if pa.types.is_integer(type) or pa.types.is_floating(type):
        return np.dtype(type.to_pandas_dtype())
    return None
