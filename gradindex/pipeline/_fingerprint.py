"""What a build records of its inputs, and how a mismatch with them is told: the fingerprint, the dataset probe, the
content hash of each shard's training samples."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradindex.featurize import Featurizer
from gradindex.store import GradientStore
from gradindex.task import Task, collate_samples

__all__ = [
    "ContentHash",
    "content_message",
    "dataset_probe",
    "fingerprint_of",
    "hashing_thread",
    "mismatch_message",
]


def _hash_leaf(digest: Any, leaf: Any) -> None:
    if isinstance(leaf, torch.Tensor):
        flat = leaf.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {flat.dtype} {tuple(leaf.shape)}|".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    elif isinstance(leaf, np.ndarray):
        digest.update(f"array {leaf.dtype} {leaf.shape}|".encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    else:
        digest.update(f"{type(leaf).__name__} {leaf!r}|".encode())


_HASHER: ThreadPoolExecutor | None = None
_HASHER_LOCK = threading.Lock()


def _forget_hasher() -> None:
    """In a forked child: the parent's thread is not there; the child's first use starts its own."""
    global _HASHER, _HASHER_LOCK
    _HASHER, _HASHER_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_hasher)


def hashing_thread() -> ThreadPoolExecutor:
    """The one background thread that hashes sliced batches and encodes shards as their rows come (one worker: the
    updates of each hash stay in order)."""
    global _HASHER
    with _HASHER_LOCK:
        if _HASHER is None:
            _HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradindex-hash")
        return _HASHER


class ContentHash:
    """sha256 of training samples as the data loader hands them to collate; any batch size gives the same.

    One running hash per leaf of an item (input, target, ...): tensors of one shape are stacked and
    hashed a batch at a time, so hashing costs little next to featurizing.
    """

    def __init__(self, collate: Any) -> None:
        self._collate = collate or collate_samples
        self._digests: list[Any] = []
        self._signatures: set[str] = set()
        self._pending: list[Future] = []  # column batches being hashed on the background thread, in order

    def __call__(self, items: list) -> Any:
        rows = [
            list(item) if isinstance(item, (tuple, list)) else torch.utils._pytree.tree_leaves(item) for item in items
        ]
        width = max(len(row) for row in rows)
        self._widen(width)
        if any(len(row) != width for row in rows):
            self._signatures.add(f"ragged {[len(row) for row in rows]}")
        for position in range(width):
            column = [row[position] for row in rows if len(row) > position]
            digest = self._digests[position]
            first = column[0]
            if isinstance(first, torch.Tensor) and all(
                isinstance(leaf, torch.Tensor) and leaf.shape == first.shape and leaf.dtype == first.dtype
                for leaf in column
            ):
                with torch.no_grad():
                    self._hash_column(position, torch.stack(column))
            else:
                for leaf in column:
                    if isinstance(leaf, (tuple, list, dict)):
                        for part in torch.utils._pytree.tree_leaves(leaf):
                            _hash_leaf(digest, part)
                    else:
                        _hash_leaf(digest, leaf)
        return self._collate(items)

    def observe_columns(self, columns: Sequence[torch.Tensor]) -> None:
        """Hash a batch handed over as its columns (a sliced ``TensorDataset``: one tensor per item position) exactly
        as ``__call__`` hashes the same items one by one: the bytes of a slice are those of its rows stacked.

        The hashing runs on a background thread (sha256 lets go of the GIL), in order, while the batch is featurized;
        the columns must not change until ``hexdigest``, which waits for it (slices of a dataset's tensors do not).
        """
        self._widen(len(columns))
        self._pending = [future for future in self._pending if not future.done() or future.exception()]
        self._pending.append(hashing_thread().submit(self._hash_columns, list(columns)))

    def _hash_columns(self, columns: list[torch.Tensor]) -> None:
        for position, column in enumerate(columns):
            self._hash_column(position, column)

    def _widen(self, width: int) -> None:
        while len(self._digests) < width:
            self._digests.append(hashlib.sha256())

    def _hash_column(self, position: int, column: torch.Tensor) -> None:
        """One item position of a batch, ``[B, *item shape]``: its signature and its bytes."""
        self._signatures.add(f"{position} tensor {column.dtype} {tuple(column.shape[1:])}")
        flat = column.detach().cpu().contiguous().reshape(-1)
        self._digests[position].update(memoryview(flat.view(torch.uint8).numpy()))

    def hexdigest(self) -> str:
        for future in self._pending:
            future.result()  # raises what the hashing raised
        self._pending = []
        final = hashlib.sha256("\n".join(sorted(self._signatures)).encode())
        for digest in self._digests:
            final.update(digest.digest())
        return final.hexdigest()


def dataset_probe(dataset: Any) -> str:
    """A hash of the dataset's size and of up to 32 evenly spaced items: cheap, and catches a swapped data set."""
    n_samples = len(dataset)
    digest = hashlib.sha256(str(n_samples).encode())
    for position in np.unique(np.linspace(0, n_samples - 1, num=min(32, n_samples)).astype(np.int64)):
        for leaf in torch.utils._pytree.tree_leaves(dataset[int(position)]):
            if isinstance(leaf, torch.Tensor):
                digest.update(leaf.detach().cpu().contiguous().numpy().tobytes())
            elif isinstance(leaf, np.ndarray):
                digest.update(np.ascontiguousarray(leaf).tobytes())
            else:
                digest.update(repr(leaf).encode())
    return digest.hexdigest()


def fingerprint_of(featurizer: Featurizer, checkpoints: Sequence, task: Task, dtype: str, model_print: dict) -> dict:
    return {
        **featurizer.fingerprint(),
        "model": model_print,
        "checkpoints": [{"sha256": ckpt.sha256, "weight": ckpt.spec.weight} for ckpt in checkpoints],
        "dataset": {"n_samples": len(task.train), "probe_sha256": dataset_probe(task.train)},
        "dtype": dtype,
    }


def mismatch_message(path: Path, diffs: list[str], expected: dict, actual: dict, fix: str) -> str:
    def value(tree: Any, dotted: str) -> Any:
        node = tree
        for part in dotted.replace("[", ".[").split("."):
            if not part:
                continue
            try:
                node = node[int(part[1:-1])] if part.startswith("[") else node[part]
            except (KeyError, IndexError, TypeError, ValueError):
                return "<absent>"
        return node

    shown = []
    for diff in diffs[:4]:
        left, right = value(expected, diff), value(actual, diff)
        if isinstance(left, str) and len(left) == 64 and isinstance(right, str):  # sha256 digests: a prefix is enough
            shown.append(f"{diff}: store has {left[:12]}…, this call has {right[:12]}…")
        elif isinstance(left, (str, int, float, bool, type(None))) and len(repr(left)) < 80:
            shown.append(f"{diff}: store has {left!r}, this call has {right!r}")
        else:
            shown.append(diff)
    more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
    return f"store {path} does not match this call: {'; '.join(shown)}{more}. {fix}"


def content_message(store: GradientStore, shard: int, expected: str, actual: str) -> str:
    start, stop = store.layout.shard_rows(shard)
    return (
        f"store {store.path} does not match this call: dataset.content_sha256 of shard {shard} (rows "
        f"{start}..{stop - 1}): "
        f"store has {expected[:12]}…, this call has {actual[:12]}…. The training set changed since those rows were "
        "written "
        "(or its items are not deterministic); resume with the same data, or rebuild with overwrite=True."
    )
