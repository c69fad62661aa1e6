"""The default collate: a list of dataset items -> one batch, whatever shape the items come in.

Items may be tuples or lists (nested any way: ``((x1, x2), y)``), dicts, or rows of a Hugging Face ``datasets``
table (python ints, floats and lists of them, numpy arrays, tensors). The batch keeps the items' structure with
every numeric leaf stacked along a new first dimension:

* tensors keep their dtype; python and numpy numbers and lists become tensors (integers ``int64``, booleans ``bool``,
  floating point ``float32`` — the dtype of a model's weights, which ``float64`` from numpy or pandas would not match);
* leaves whose first dimension differs between items (variable-length sequences) are padded on the right to the
  longest: a label with ``-100`` (the ignore index of every cross-entropy), ``attention_mask`` with 0, anything else
  with the task's ``pad_value`` (default 0); a dict batch padded this way without an ``attention_mask`` gets one
  (1 for a real position, 0 for padding);
* non-numeric values (strings, ``None``) in a dict are dropped — a model and its per-sample gradients (which
  ``torch.func.vmap`` computes over tensors only) cannot use them; a non-numeric element of a tuple is an error,
  because dropping it would shift which element is the label.

A list or tuple *inside* an item whose leaves are all numbers is one sequence (HF rows store ``input_ids`` so); the
item itself, and tuples or lists of tensors inside it, are structure.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradindex.errors import TaskSpecError

__all__ = ["LABEL_KEYS", "collate_samples"]

# the dict keys that hold labels by convention (HF's Trainer reads ``labels``, ``datasets`` tables often ``label``)
LABEL_KEYS = ("labels", "label")
IGNORE_INDEX = -100


def collate_samples(items: Sequence[Any], *, pad_value: int | float = 0, label: str | int | None = None) -> Any:
    """One batch from a list of dataset items: numeric leaves stacked (padded when their lengths differ).

    Args:
        items: the items, as ``dataset[i]`` returns them: tuples/lists (nested), dicts, HF ``datasets`` rows, tensors.
        pad_value: what pads variable-length inputs such as ``input_ids`` (labels pad with -100, ``attention_mask``
            with 0).
        label: the dict key (or tuple position) of the label when it is not ``labels``/``label`` (or the tuple's last
            element); it pads with -100.

    Returns:
        The batch, with the items' structure: a tuple, list or dict of tensors whose first dimension is ``len(items)``.

    Raises:
        TaskSpecError: the items differ in structure, a tuple holds a non-numeric value, or leaves cannot be stacked.
    """
    if len(items) == 0:
        raise TaskSpecError("cannot collate an empty list of items; a batch needs at least one sample")
    first = items[0]
    if isinstance(first, Mapping):
        return _collate_dict(items, pad_value, label)
    if isinstance(first, (tuple, list)):
        return _collate_tuple(items, pad_value, label)
    leaf = _collate_leaf(items, "the items", pad_value)
    if leaf is None:
        raise TaskSpecError(
            f"dataset items of type {type(first).__name__} are not numbers, tensors, tuples or dicts; return one of "
            "those from __getitem__, or give Task(collate=...)"
        )
    return leaf


def _collate_dict(items: Sequence[Any], pad_value: int | float, label: str | int | None) -> dict:
    keys = list(items[0].keys())
    for item in items[1:]:
        if not isinstance(item, Mapping) or list(item.keys()) != keys:
            got = list(item.keys()) if isinstance(item, Mapping) else type(item).__name__
            raise TaskSpecError(
                f"dataset items differ in structure: one has keys {keys}, another {got}; every item must have the "
                "same keys"
            )
    labels = {*LABEL_KEYS, label} if isinstance(label, str) else set(LABEL_KEYS)
    batch: dict[str, Any] = {}
    padded: dict[str, list[int]] = {}
    for key in keys:
        values = [item[key] for item in items]
        if isinstance(values[0], Mapping) or _is_structure(values[0]):
            batch[key] = collate_samples(values, pad_value=pad_value)
            continue
        fill = IGNORE_INDEX if key in labels else 0 if key == "attention_mask" else pad_value
        lengths: list[int] = []
        leaf = _collate_leaf(values, f"key {key!r}", fill, lengths)
        if leaf is None:
            continue  # strings and other non-numeric values: dropped (see the module docstring)
        batch[key] = leaf
        if lengths and key not in labels:
            padded[key] = lengths
    if padded and "attention_mask" not in batch:
        source = "input_ids" if "input_ids" in padded else next(iter(padded))
        lengths = torch.as_tensor(padded[source])
        width = batch[source].shape[1]
        batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return batch


def _collate_tuple(items: Sequence[Any], pad_value: int | float, label: str | int | None) -> Any:
    width = len(items[0])
    kind = type(items[0])
    for item in items[1:]:
        if not isinstance(item, (tuple, list)) or len(item) != width:
            raise TaskSpecError(
                f"dataset items differ in structure: one is a {kind.__name__} of {width}, another "
                f"{type(item).__name__} of {len(item) if isinstance(item, (tuple, list)) else '?'}; every item must "
                "have the same structure"
            )
    label_position = (label % width if isinstance(label, int) and width else width - 1) if width else None
    columns = []
    for position in range(width):
        values = [item[position] for item in items]
        if isinstance(values[0], Mapping):
            columns.append(_collate_dict(values, pad_value, label))
        elif _is_structure(values[0]):
            columns.append(_collate_tuple(values, pad_value, None))
        else:
            fill = IGNORE_INDEX if position == label_position and width > 1 else pad_value
            leaf = _collate_leaf(values, f"element {position} of the items", fill)
            if leaf is None:
                raise TaskSpecError(
                    f"element {position} of the dataset's items is a {type(values[0]).__name__}, not a number or "
                    "tensor; return only tensors and numbers (or a dict, whose strings are dropped), or give "
                    "Task(collate=...)"
                )
            columns.append(leaf)
    if isinstance(items[0], tuple) and hasattr(items[0], "_fields"):  # a namedtuple keeps its type
        return kind(*columns)
    return tuple(columns) if isinstance(items[0], tuple) else columns


def _is_structure(value: Any) -> bool:
    """A tuple or list of tensors/arrays/structures (not a sequence of plain numbers, which is one leaf)."""
    if not isinstance(value, (tuple, list)) or len(value) == 0:
        return False
    return not all(_is_plain_number(part) or _is_number_list(part) for part in value)


def _is_plain_number(value: Any) -> bool:
    return isinstance(value, (numbers.Number, np.generic)) and not isinstance(value, (str, bytes))


def _is_number_list(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(_is_plain_number(p) or _is_number_list(p) for p in value)


def _as_tensor(value: Any) -> Tensor | None:
    """A numeric value as a tensor (float64 that is not already a tensor as float32); None when it is not numeric."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            return None
        tensor = torch.from_numpy(np.ascontiguousarray(value))
    elif isinstance(value, (bool, np.bool_)):
        return torch.tensor(bool(value))
    elif _is_plain_number(value):
        if isinstance(value, complex):
            return None
        tensor = torch.tensor(value.item() if isinstance(value, np.generic) else value)
    elif isinstance(value, (tuple, list)) and len(value) == 0:
        return torch.zeros(0, dtype=torch.long)  # an empty sequence: of token ids, most often
    elif isinstance(value, (tuple, list)) and _is_number_list(value):
        try:
            tensor = torch.tensor(value)
        except (ValueError, TypeError, RuntimeError) as error:
            raise TaskSpecError(
                f"a nested list in the dataset's items is ragged ({error}); make its inner lists equal in length"
            ) from error
    else:
        return None
    return tensor.float() if tensor.dtype == torch.float64 else tensor


def _collate_leaf(
    values: Sequence[Any], where: str, fill: int | float, lengths: list[int] | None = None
) -> Tensor | None:
    """Stack one leaf of every item (padding along the first dimension when it differs); None when not numeric."""
    tensors = [_as_tensor(value) for value in values]
    if any(tensor is None for tensor in tensors):
        if all(tensor is None for tensor in tensors):
            return None
        raise TaskSpecError(f"{where} is numeric in some items and not in others; give every item the same types")
    shapes = {tuple(tensor.shape) for tensor in tensors}
    dtypes = {tensor.dtype for tensor in tensors}
    if len(dtypes) > 1:
        dtype = functools.reduce(torch.promote_types, dtypes)
        tensors = [tensor.to(dtype) for tensor in tensors]
    if len(shapes) == 1:
        return torch.stack(tensors)
    if any(tensor.ndim == 0 for tensor in tensors) or len({shape[1:] for shape in shapes}) > 1:
        raise TaskSpecError(
            f"{where} has shapes {sorted(shapes)[:3]} across items, which neither stack nor pad (only the first "
            "dimension may vary); make them agree or give Task(collate=...)"
        )
    longest = max(tensor.shape[0] for tensor in tensors)
    out = tensors[0].new_full((len(tensors), longest, *tensors[0].shape[1:]), fill)
    for row, tensor in enumerate(tensors):
        out[row, : tensor.shape[0]] = tensor
    if lengths is not None:
        lengths.extend(int(tensor.shape[0]) for tensor in tensors)
    return out
