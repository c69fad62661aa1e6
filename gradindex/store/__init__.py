"""The gradient store (Zarr v3 + Parquet). Knows nothing of torch models or FAISS."""

from gradindex.store._atomic import StoreWriteError, write_bytes_atomic
from gradindex.store._remote import RemotePath, StorageError, parse_storage_options, store_path
from gradindex.store._store import (
    FORMAT,
    GradientStore,
    StoreLayout,
    create_store,
    fingerprint_differences,
    open_store,
    sweep_orphans,
)

__all__ = [
    "FORMAT",
    "GradientStore",
    "RemotePath",
    "StorageError",
    "StoreLayout",
    "StoreWriteError",
    "create_store",
    "fingerprint_differences",
    "open_store",
    "parse_storage_options",
    "store_path",
    "sweep_orphans",
    "write_bytes_atomic",
]
