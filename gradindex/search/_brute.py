"""The trusted slow path: exact top-k in plain numpy, to check the faiss paths against."""

from __future__ import annotations

import numpy as np

from gradindex.search._arrays import Float32Buffer, as_matrix, check_finite
from gradindex.utils import check_positive_int

__all__ = ["brute_force_topk"]


def brute_force_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of ``vectors [n, d]`` by inner product with ``queries [q, d]``, by float64 matmul and a full sort.

    Returns ``(scores [q, k'] float64, rows [q, k'] int64)`` with ``k' = min(k, n)``, highest score
    first, ties by row. Memory is ``q x n`` float64: for tests and benchmarks, not for stores.
    """
    k = check_positive_int("k", k)
    vectors = as_matrix(vectors, "vectors")
    queries = as_matrix(queries, "queries", vectors.shape[1], "the vectors have")
    # the same refusal as the fast paths, so that both are compared on the inputs they accept
    check_finite(vectors, "vectors", Float32Buffer())
    check_finite(queries, "queries", Float32Buffer())
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    k_found = min(k, vectors.shape[0])
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k_found]  # stable: equal scores stay in row order
    return np.take_along_axis(scores, rows, axis=1), rows.astype(np.int64)
