"""Looking at a store: its manifest, progress and indexes (``info``), and every checksum re-checked (``verify``)."""

from __future__ import annotations

from pathlib import Path

from gradindex.search import list_indexes
from gradindex.store import GradientStore, as_store

__all__ = ["info", "verify"]


def info(store: GradientStore | str | Path, *, storage_options: dict | None = None) -> dict:
    """The store's manifest, build progress and persisted indexes, as a dict.

    Args:
        store: the store: a path, an fsspec URL or an opened ``GradientStore``.
        storage_options: options of the fsspec filesystem of a store URL.

    Returns:
        The manifest (format, fingerprint, layout, checkpoints, task, ...) with ``path``, ``progress`` and
        ``indexes`` (each persisted index's meta: factory, recall, nprobe, stale).
    """
    store = as_store(store, storage_options)
    details = store.describe()
    details["indexes"] = list_indexes(store)
    return details


def verify(store: GradientStore | str | Path, *, storage_options: dict | None = None) -> list[str]:
    """Re-hash every file of the store against its recorded checksum.

    Args:
        store: the store: a path, an fsspec URL or an opened ``GradientStore``.
        storage_options: options of the fsspec filesystem of a store URL.

    Returns:
        The problems found, one sentence each naming the shard or file (empty when the store is sound).
    """
    return as_store(store, storage_options).verify()
