"""gradindex: a gradient-index database for training-data attribution.

Build per-sample gradient vectors of a model at its checkpoints into a Zarr store, then ask which
training samples most influenced a prediction (FAISS inner-product search) and which look wrong
(self-influence)::

    import gradindex
    store = gradindex.build("digits", ["ckpt-10.pt:0.1", "ckpt-20.pt:0.1"], "digits.gradindex")
    gradindex.query(store, split="test", samples=[0, 1], k=5)      # -> pyarrow.Table
    gradindex.self_influence(store, top=20)                        # -> pyarrow.Table
"""

__version__ = "0.1.0"

from gradindex._errors import (  # noqa: E402
    CheckpointError,
    CorruptStoreError,
    GradIndexError,
    GradIndexWarning,
    IncompatibleStoreError,
    IncompleteStoreError,
    NonFiniteError,
    SearchError,
    ShardOwnershipError,
    StoreExistsError,
    StoreNotFoundError,
    TaskSpecError,
)
from gradindex.checkpoints import CheckpointSpec  # noqa: E402
from gradindex.project import ProjectionSpec  # noqa: E402
from gradindex.task import Task, load_task  # noqa: E402
from gradindex.store import GradientStore, StoreWriteError, open_store  # noqa: E402
from gradindex.pipeline import BuildConfig, build, info, query, search_store, self_influence, verify  # noqa: E402
from gradindex.curate import curate  # noqa: E402  (the name is the function; the module stays in sys.modules)
from gradindex.report import report  # noqa: E402
from gradindex.ensemble import EnsembleConfig, make_ensemble  # noqa: E402
from gradindex.pipeline import finalize  # noqa: E402
from gradindex.indexes import build_index, drop_index, list_indexes  # noqa: E402

__all__ = [
    "__version__",
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
    "NonFiniteError",
    "ProjectionSpec",
    "SearchError",
    "ShardOwnershipError",
    "StoreExistsError",
    "StoreNotFoundError",
    "StoreWriteError",
    "Task",
    "TaskSpecError",
    "build",
    "build_index",
    "curate",
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
    "verify",
]
