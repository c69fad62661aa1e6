"""The gradient store (Zarr v3 + Parquet), local or at an fsspec URL. Knows nothing of torch models or FAISS.

``create_store`` / ``open_store`` give a ``GradientStore``: shards written atomically with checksums, read back
verified, a manifest that says what the vectors mean. ``gradindex.store.faults`` is its fault-injection seam.

Zarr, numpy and pyarrow load with the first use of a name that needs them (``GradientStore``, ``open_store``, ...):
importing this package, for its format constants or its paths, stays light.
"""

from typing import TYPE_CHECKING

from gradindex.errors import StorageError, StoreWriteError
from gradindex.store._atomic import remove_file, write_bytes_atomic, write_failure
from gradindex.store._manifest import FORMAT, STORE_DTYPES, write_manifest
from gradindex.store._paths import REBUILD_STORE, check_file_name, contained_path, is_inside
from gradindex.store._remote import (
    DEFAULT_CLAIM_TIMEOUT,
    RemotePath,
    claim_timeout,
    is_remote,
    parse_storage_options,
    store_path,
)
from gradindex.utils import lazy_exports

__all__ = [
    "DEFAULT_CLAIM_TIMEOUT",
    "FORMAT",
    "REBUILD_STORE",
    "STORE_DTYPES",
    "GradientStore",
    "RemotePath",
    "ShardEncoder",
    "StorageError",
    "StoreLayout",
    "StoreWriteError",
    "arrow_of",
    "as_store",
    "cast_vectors",
    "check_file_name",
    "claim_timeout",
    "contained_path",
    "create_store",
    "fingerprint_differences",
    "is_inside",
    "is_remote",
    "numpy_of",
    "open_store",
    "parse_storage_options",
    "remove_file",
    "store_path",
    "sweep_orphans",
    "write_bytes_atomic",
    "write_failure",
    "write_manifest",
]

if TYPE_CHECKING:  # loaded on first use (lazy_exports)
    from gradindex.store._arrow import arrow_of, numpy_of
    from gradindex.store._encoder import ShardEncoder
    from gradindex.store._store import (
        GradientStore,
        StoreLayout,
        as_store,
        cast_vectors,
        create_store,
        fingerprint_differences,
        open_store,
        sweep_orphans,
    )

__getattr__, __dir__ = lazy_exports(__name__)
