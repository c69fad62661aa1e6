"""gradindex: a gradient-index database for training-data attribution.

Build per-sample gradient vectors of a model at its checkpoints into a Zarr store, then ask which
training samples most influenced a prediction (FAISS inner-product search) and which look wrong
(self-influence)::

    import gradindex
    store = gradindex.build("digits", ["ckpt-10.pt:0.1", "ckpt-20.pt:0.1"], "digits.gradindex")
    gradindex.query(store, split="test", samples=[0, 1], k=5)      # -> pyarrow.Table
    gradindex.self_influence(store, top=20)                        # -> pyarrow.Table
"""

import os
from typing import TYPE_CHECKING

# pyarrow's default memory pool (mimalloc) sometimes aborts the process at exit beside torch ("terminate called without
# an active exception", exit 134, after the output is written): the system allocator does not. Set before pyarrow loads.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from gradindex.errors import (
    ArgumentError,
    CheckpointError,
    CorruptStoreError,
    GradIndexError,
    GradIndexWarning,
    IncompatibleStoreError,
    IncompleteStoreError,
    NonFiniteError,
    ResourceLimitError,
    SearchError,
    ShardOwnershipError,
    StorageError,
    StoreExistsError,
    StoreNotFoundError,
    StoreWriteError,
    TaskSpecError,
)
from gradindex.utils import lazy_exports
from gradindex.version import __version__

__all__ = [
    "ArgumentError",
    "BuildConfig",
    "CheckpointError",
    "CheckpointSpec",
    "CorruptStoreError",
    "EnsembleConfig",
    "GradIndexError",
    "GradIndexWarning",
    "GradientStore",
    "IncompatibleStoreError",
    "IncompleteStoreError",
    "IndexConfig",
    "NonFiniteError",
    "ProjectionSpec",
    "QueryConfig",
    "ResourceLimitError",
    "SearchError",
    "ShardOwnershipError",
    "StorageError",
    "StoreExistsError",
    "StoreNotFoundError",
    "StoreWriteError",
    "TableDataset",
    "Task",
    "TaskSpecError",
    "__version__",
    "build",
    "build_index",
    "causal_lm_loss",
    "causal_lm_margin",
    "collate_samples",
    "connect",
    "cross_entropy_loss",
    "curate",
    "default_loss",
    "default_margin",
    "drop_index",
    "finalize",
    "info",
    "list_indexes",
    "load_task",
    "make_ensemble",
    "open_store",
    "query",
    "report",
    "search_store",
    "self_influence",
    "serve",
    "verify",
]

# Everything else loads with its first use (PEP 562): importing gradindex imports neither torch nor faiss, so a client
# that only reads stores, and the command line's --help, info and verify, start without them.
if TYPE_CHECKING:  # loaded on first use (lazy_exports)
    from gradindex.apps import connect, curate, report, serve
    from gradindex.checkpoints import CheckpointSpec
    from gradindex.ensemble import EnsembleConfig, make_ensemble
    from gradindex.pipeline import BuildConfig, QueryConfig, build, finalize, info, query, self_influence, verify
    from gradindex.projection import ProjectionSpec
    from gradindex.search import IndexConfig, build_index, drop_index, list_indexes, search_store
    from gradindex.store import GradientStore, open_store
    from gradindex.task import (
        TableDataset,
        Task,
        causal_lm_loss,
        causal_lm_margin,
        collate_samples,
        cross_entropy_loss,
        default_loss,
        default_margin,
        load_task,
    )

__getattr__, __dir__ = lazy_exports(__name__)
