"""What a collated batch is, once for every stage: its size, a slice of it, it on a device, it gathered from rows.

A batch is whatever the task's collate returns: a tensor, or tuples, lists and dicts of them nested any way
(``((x1, x2), y)``, ``{"input_ids": ..., "labels": ...}``). Its size is the first dimension of its first tensor
leaf, in pytree order; every tensor leaf is cut along that dimension.

Its labels are found by one rule (``split_batch``), which the default loss, the margin and the reports share: in a
dict, the key the task names (``Task(label=...)``), else ``labels``, else ``label``; in a tuple, the element at the
position the task names, else the last one, and the other elements are the model's inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.data import TensorDataset

from gradindex.errors import TaskSpecError
from gradindex.task._collate import LABEL_KEYS, collate_samples

__all__ = ["batch_size", "gather_batch", "labels_of", "slice_batch", "split_batch", "to_device"]


def batch_size(batch: Any) -> int:
    """The number of samples in a collated batch: the first dimension of its first tensor."""
    for leaf in tree_leaves(batch):
        if isinstance(leaf, Tensor):
            if leaf.ndim == 0:
                raise TaskSpecError(
                    "a batch's first tensor is a scalar; the task's collate must stack samples along dimension 0"
                )
            return int(leaf.shape[0])
    raise TaskSpecError("a batch holds no tensors; the task's collate must return tensors")


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a collated batch (every tensor cut along its first dimension)."""
    return tree_map(lambda leaf: leaf[start:stop] if isinstance(leaf, Tensor) else leaf, batch)


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor on ``device`` (tuples, lists and dicts rebuilt as their own type)."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(item, device) for item in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch


def gather_batch(dataset: Any, rows: Sequence[int] | Tensor, collate: Any, device: torch.device) -> Any:
    """The collated batch of ``dataset`` at ``rows`` on ``device`` (a TensorDataset with the default collate is indexed
    directly; any other data set goes through ``collate``, by default ``collate_samples``)."""
    if collate is None and isinstance(dataset, TensorDataset):
        index = torch.as_tensor(rows, dtype=torch.long)
        return tuple(tensor[index].to(device) for tensor in dataset.tensors)
    return to_device((collate or collate_samples)([dataset[int(row)] for row in rows]), device)


def split_batch(batch: Any, label: str | int | None = None) -> tuple[tuple | dict, Any]:
    """A collated batch split into the model's inputs and its labels, by the one rule of the module docstring.

    Args:
        batch: a collated batch: a dict, a tuple or list, or a single tensor (inputs only).
        label: the dict key or tuple position of the labels (``Task.label``); None follows the conventions.

    Returns:
        ``(inputs, labels)``: inputs are a tuple of positional arguments (tuple batches, a tensor) or a dict of
        keyword arguments (dict batches); labels are None when the batch has none.

    Raises:
        TaskSpecError: the batch is of another type, or the named label is not in it.
    """
    if isinstance(batch, Mapping):
        if isinstance(label, str):
            if label not in batch:
                raise TaskSpecError(
                    f"the batch has no key {label!r} (keys: {', '.join(map(str, batch))}); name the label's key with "
                    "Task(label=...)"
                )
            key = label
        elif label is not None:
            raise TaskSpecError(
                f"Task(label={label!r}) names a tuple position but the batches are dicts; name the label's key"
            )
        else:
            key = next((name for name in LABEL_KEYS if name in batch), None)
        return {name: value for name, value in batch.items() if name != key}, (batch[key] if key else None)
    if isinstance(batch, (tuple, list)):
        if isinstance(label, str):
            raise TaskSpecError(
                f"Task(label={label!r}) names a dict key but the batches are tuples; name the label's position "
                "(e.g. label=-1) or leave it out (the last element is the label)"
            )
        if len(batch) == 0:
            raise TaskSpecError("a batch is an empty tuple; the task's items must hold the model's inputs")
        if len(batch) == 1 and label is None:
            return tuple(batch), None
        position = (label if label is not None else -1) % len(batch)
        return tuple(item for index, item in enumerate(batch) if index != position), batch[position]
    if isinstance(batch, Tensor):
        return (batch,), None
    raise TaskSpecError(
        f"a batch is a {type(batch).__name__}; the default loss takes tuples, dicts or tensors: give Task(loss=...) "
        "and Task(collate=...) for other batches"
    )


def labels_of(batch: Any, label: str | int | None = None) -> np.ndarray | None:
    """The labels of a collated batch as numpy when they are per-sample scalars (``[B]``), else None.

    Args:
        batch: a collated batch.
        label: the dict key or tuple position of the labels (``Task.label``); None follows the conventions (``labels``
            or ``label`` key, the tuple's last element).
    """
    try:
        _, labels = split_batch(batch, label)
    except TaskSpecError:
        return None
    if isinstance(labels, Tensor) and labels.ndim == 1:
        return labels.detach().cpu().numpy()
    return None
