"""Tables as datasets: a pandas DataFrame, a pyarrow Table or a Hugging Face ``datasets.Dataset``, column by column.

Each numeric column becomes one tensor, once, when the adapter is made (integers ``int64``, booleans ``bool``,
floating point ``float32``); a column of equal-length lists or arrays becomes a ``[N, L, ...]`` tensor, one of
varying-length lists a list of 1-D tensors that the default collate pads. Row i is a dict ``{column: value}``, so
batches are dict batches: ``model(**inputs)`` with the label found under ``labels``/``label`` or the name the adapter
was given. Strings and other non-numeric columns are left out unless named (then they are an error).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from gradindex.errors import TaskSpecError

__all__ = ["TableDataset", "is_table"]


def _kind(table: Any) -> str | None:
    module = type(table).__module__.split(".")[0]
    name = type(table).__name__
    if module == "pandas" and name == "DataFrame":
        return "pandas"
    if isinstance(table, pa.Table):
        return "arrow"
    if module == "datasets" and name == "Dataset":
        return "datasets"
    return None


def is_table(data: Any) -> bool:
    """Whether ``data`` is a pandas DataFrame or a pyarrow Table (which ``Task`` wraps in a ``TableDataset``)."""
    return _kind(data) in ("pandas", "arrow")


def _as_arrow(table: Any) -> pa.Table:
    kind = _kind(table)
    if kind == "arrow":
        return table
    if kind == "pandas":
        return pa.Table.from_pandas(table, preserve_index=False)
    if kind == "datasets":
        return table.with_format("arrow")[:]  # the rows as the dataset shows them (after select, shuffle, filter)
    raise TaskSpecError(
        f"TableDataset takes a pandas DataFrame, a pyarrow Table or a datasets.Dataset, got {type(table).__name__}"
    )


def _numeric(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype)


def _is_list(dtype: pa.DataType) -> bool:
    return pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype)


def _leaf_type(dtype: pa.DataType) -> pa.DataType:
    while _is_list(dtype):
        dtype = dtype.value_type
    return dtype


def _tensor(array: np.ndarray) -> Tensor:
    array = np.ascontiguousarray(array)
    tensor = torch.from_numpy(array if array.flags.writeable else array.copy())  # arrow's buffers are read-only
    return tensor.float() if tensor.dtype == torch.float64 else tensor


def _column(name: str, column: pa.ChunkedArray) -> Tensor | list[Tensor]:
    """One column as a tensor ``[N, ...]``, or a list of N tensors when its lists vary in length."""
    if column.null_count:
        raise TaskSpecError(f"column {name!r} has {column.null_count} missing values; fill or drop them first")
    dtype = column.type
    if _numeric(dtype):
        return _tensor(column.to_numpy())
    array = column.combine_chunks()
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        if _numeric(dtype.value_type):
            offsets = array.offsets.to_numpy()
            values = array.values.to_numpy(zero_copy_only=False)
            lengths = np.diff(offsets)
            if len(lengths) and (lengths == lengths[0]).all():
                return _tensor(values[offsets[0] : offsets[-1]].reshape(len(lengths), int(lengths[0])))
            return [_tensor(values[start:stop]) for start, stop in itertools.pairwise(offsets)]
        rows = array.to_pylist()  # nested lists (e.g. 2-D features): each row an array
        try:
            pieces = [np.asarray(row) for row in rows]
        except ValueError as error:
            raise TaskSpecError(f"column {name!r} holds ragged nested lists; give rectangular values") from error
        if pieces and all(piece.shape == pieces[0].shape for piece in pieces):
            return _tensor(np.stack(pieces))
        return [_tensor(piece) for piece in pieces]
    if pa.types.is_fixed_size_list(dtype):
        rows = array.to_numpy(zero_copy_only=False)
        return _tensor(np.stack([np.asarray(row) for row in rows]) if len(rows) else np.zeros((0, dtype.list_size)))
    raise TaskSpecError(f"column {name!r} is {dtype}, not numbers or lists of numbers; leave it out of columns")


class TableDataset:
    """A map-style dataset over a table's columns: row i is ``{column: tensor}``.

    Args:
        table: a pandas ``DataFrame``, a pyarrow ``Table`` or a Hugging Face ``datasets.Dataset``.
        columns: the columns to keep (default: every numeric column and every column of lists of numbers; strings
            and other columns are left out).
        label: the label column; in each row it is named ``labels`` (the convention the default loss and the reports
            follow), and it is kept even when ``columns`` leaves it out.
        stack: rows as tuples ``(features, label)`` instead of dicts, where ``features`` is the ``columns`` (numeric
            scalars) stacked into one ``float32`` vector — the input of an MLP on tabular data (``model(features)``).

    Raises:
        TaskSpecError: the table is of another type, a named column is missing or not numeric, or has missing values.

    Example::

        train = gradindex.TableDataset(df, columns=["x1", "x2", "x3"], label="y", stack=True)
        gradindex.Task(model=make_mlp, train=train)
    """

    def __init__(
        self, table: Any, columns: Sequence[str] | None = None, label: str | None = None, *, stack: bool = False
    ) -> None:
        arrow = _as_arrow(table)
        names = list(arrow.column_names)
        wanted = list(columns) if columns is not None else None
        for name in [*(wanted or []), *([label] if label is not None else [])]:
            if name not in names:
                raise TaskSpecError(f"the table has no column {name!r}; its columns are {', '.join(names)}")
        if wanted is None:
            wanted = [
                name
                for name in names
                if name != label
                and (_numeric(arrow.column(name).type) or _numeric(_leaf_type(arrow.column(name).type)))
            ]
        wanted = [name for name in wanted if name != label]
        self.n_rows = arrow.num_rows
        self.columns: dict[str, Tensor | list[Tensor]] = {name: _column(name, arrow.column(name)) for name in wanted}
        self.label = label
        self.labels = _column(label, arrow.column(label)) if label is not None else None
        self.stack = stack
        if stack:
            if not wanted:
                raise TaskSpecError("TableDataset(stack=True) needs at least one feature column")
            flat = list(self.columns.values())
            if any(not isinstance(value, Tensor) or value.ndim != 1 for value in flat):
                raise TaskSpecError("TableDataset(stack=True) stacks numeric scalar columns; leave out list columns")
            self.features = torch.stack([value.float() for value in flat], dim=1)

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, index: int) -> Any:
        if not -self.n_rows <= index < self.n_rows:
            raise IndexError(f"row {index} of a table of {self.n_rows}")
        if self.stack:
            return (self.features[index],) if self.labels is None else (self.features[index], self.labels[index])
        row = {name: values[index] for name, values in self.columns.items()}
        if self.labels is not None:
            row["labels"] = self.labels[index]
        return row

    def __repr__(self) -> str:
        shown = ", ".join(self.columns)
        return f"TableDataset({self.n_rows} rows: {shown}{'; labels ' + self.label if self.label else ''})"
