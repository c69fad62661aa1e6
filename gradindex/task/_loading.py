"""Batches for featurization: tensor slicing when the data set allows it, and loading overlapped with compute.

A ``TensorDataset`` (or a ``Subset`` of one, over consecutive rows) with the default collate is sliced
directly: no per-item ``__getitem__`` and ``stack``, which at tens of thousands of samples per second
would cost more than the featurization itself. Any other data set goes through a ``DataLoader``, and
a background thread keeps ``prefetch`` batches ready, so the next batch is collated while the current
one is featurized (torch ops release the GIL, so the two overlap even on one core pair). The default collate is
``collate_samples`` (tuples, dicts, HF rows, variable-length sequences padded).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from gradindex.task._collate import collate_samples

__all__ = ["iter_batches", "tensor_rows"]

_DONE = object()


def tensor_rows(dataset: Any, rows: Sequence[int] | range) -> tuple[tuple[torch.Tensor, ...], range] | None:
    """The tensors and a consecutive row range when ``dataset[rows]`` is plain slicing of tensors, else None."""
    offset = 0
    while isinstance(dataset, Subset):
        indices = dataset.indices
        if not isinstance(indices, range) or indices.step != 1:
            return None
        offset += indices.start
        dataset = dataset.dataset
    if type(dataset) is not TensorDataset:
        return None
    if isinstance(rows, range) and rows.step == 1:
        return dataset.tensors, range(rows.start + offset, rows.stop + offset)
    return None


def _loader_batches(
    dataset: Any, rows: Sequence[int] | range, batch_size: int, collate, num_workers: int
) -> Iterator[Any]:
    loader = DataLoader(
        Subset(dataset, rows),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate or collate_samples,
        num_workers=num_workers,
        persistent_workers=False,
    )
    yield from loader


def _prefetched(batches: Iterator[Any], depth: int) -> Iterator[Any]:
    """``batches`` produced by a background thread, at most ``depth`` ahead; errors re-raised in order."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        slots.put((batch, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((_DONE, None))
        except BaseException as error:  # handed to the consumer, raised where it reads
            slots.put((_DONE, error))

    worker = threading.Thread(target=produce, name="gradindex-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            batch, error = slots.get()
            if error is not None:
                raise error
            if batch is _DONE:
                return
            yield batch
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get_nowait()
            except queue.Empty:
                pass
            worker.join(timeout=0.05)


def iter_batches(
    dataset: Any,
    rows: Sequence[int] | range,
    batch_size: int,
    collate=None,
    *,
    num_workers: int = 0,
    prefetch: int = 2,
) -> Iterator[Any]:
    """Collated batches of ``dataset[rows]`` in order; the next ones prepared while the caller works."""
    if collate is None and num_workers == 0:
        sliced = tensor_rows(dataset, rows)
        if sliced is not None:
            tensors, span = sliced
            for start in range(span.start, span.stop, batch_size):
                stop = min(span.stop, start + batch_size)
                yield [tensor[start:stop] for tensor in tensors]
            return
    batches = _loader_batches(dataset, rows, batch_size, collate, num_workers)
    if prefetch > 0 and num_workers == 0:
        batches = _prefetched(batches, prefetch)
    yield from batches
