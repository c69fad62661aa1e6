"""What a collated batch is, once for every stage: its size, a slice of it, it on a device, it gathered from rows.

A batch is whatever the task's collate returns: a tensor, or tuples, lists and dicts of them nested any way
(``((x1, x2), y)``, ``{"input_ids": ..., "labels": ...}``). Its size is the first dimension of its first tensor
leaf, in pytree order; every tensor leaf is cut along that dimension.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.data import TensorDataset, default_collate

from gradindex.errors import TaskSpecError

__all__ = ["batch_size", "gather_batch", "labels_of", "slice_batch", "to_device"]


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
    directly)."""
    if collate is None and isinstance(dataset, TensorDataset):
        index = torch.as_tensor(rows, dtype=torch.long)
        return tuple(tensor[index].to(device) for tensor in dataset.tensors)
    return to_device((collate or default_collate)([dataset[int(row)] for row in rows]), device)


def labels_of(batch: Any) -> np.ndarray | None:
    """The targets of a collated ``(input, target, ...)`` batch as numpy, when they are per-sample scalars."""
    if isinstance(batch, (list, tuple)) and len(batch) > 1 and isinstance(batch[1], Tensor) and batch[1].ndim == 1:
        return batch[1].detach().cpu().numpy()
    return None
