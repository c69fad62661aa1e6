"""Looking at a store: its manifest, progress and indexes (``info``), and every checksum re-checked (``verify``)."""

from __future__ import annotations

from pathlib import Path

from gradindex.search import list_indexes
from gradindex.store import GradientStore, as_store

__all__ = ["info", "verify"]


def info(store: GradientStore | str | Path, *, storage_options: dict | None = None) -> dict:
    """The store's manifest and build progress, and its persisted indexes (``indexes``: recall, factory, ...)."""
    store = as_store(store, storage_options)
    details = store.describe()
    details["indexes"] = list_indexes(store)
    return details


def verify(store: GradientStore | str | Path, *, storage_options: dict | None = None) -> list[str]:
    """Every shard re-hashed against its recorded checksum; the problems found (empty when sound)."""
    return as_store(store, storage_options).verify()
