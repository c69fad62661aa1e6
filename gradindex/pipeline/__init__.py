"""The pipeline: the one place where task, featurizer, store and search meet.

``build`` (and ``finalize``) writes a store; ``query`` and ``self_influence`` read it back through the same
featurizer; ``info`` and ``verify`` look at it. The settings (``BuildConfig``, ``QueryConfig``) are light; the stages
load with their first use, and torch only with a stage that featurizes.
"""

from typing import TYPE_CHECKING

from gradindex.pipeline._config import NONFINITE_POLICIES, BuildConfig, QueryConfig, rank_device
from gradindex.utils import lazy_exports

__all__ = [
    "NONFINITE_POLICIES",
    "BuildConfig",
    "QueryConfig",
    "QuerySession",
    "build",
    "finalize",
    "info",
    "method_query_options",
    "parse_samples",
    "plan_rows",
    "query",
    "query_featurizer",
    "rank_device",
    "self_influence",
    "task_for_store",
    "verify",
]

if TYPE_CHECKING:  # loaded on first use (lazy_exports)
    from gradindex.pipeline._build import build, finalize
    from gradindex.pipeline._inspect import info, plan_rows, verify
    from gradindex.pipeline._query import (
        QuerySession,
        method_query_options,
        parse_samples,
        query,
        query_featurizer,
        self_influence,
        task_for_store,
    )

__getattr__, __dir__ = lazy_exports(__name__)
