"""The pipeline: the one place where task, featurizer, store and search meet.

``build`` (and ``finalize``) writes a store; ``query`` and ``self_influence`` read it back through the same
featurizer; ``info`` and ``verify`` look at it.
"""

from gradindex.pipeline._build import NONFINITE_POLICIES, BuildConfig, build, finalize
from gradindex.pipeline._inspect import info, plan_rows, verify
from gradindex.pipeline._query import (
    QueryConfig,
    parse_samples,
    query,
    query_featurizer,
    self_influence,
    task_for_store,
)

__all__ = [
    "NONFINITE_POLICIES",
    "BuildConfig",
    "QueryConfig",
    "build",
    "finalize",
    "info",
    "parse_samples",
    "plan_rows",
    "query",
    "query_featurizer",
    "self_influence",
    "task_for_store",
    "verify",
]
