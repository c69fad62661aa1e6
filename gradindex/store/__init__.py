"""The gradient store (Zarr v3 + Parquet). Knows nothing of torch models or FAISS."""

from gradindex.store._atomic import write_bytes_atomic
from gradindex.store._store import (
    FORMAT,
    GradientStore,
    StoreLayout,
    create_store,
    fingerprint_differences,
    open_store,
)

__all__ = [
    "FORMAT",
    "GradientStore",
    "StoreLayout",
    "create_store",
    "fingerprint_differences",
    "open_store",
    "write_bytes_atomic",
]
