"""Exact inner-product search with FAISS: in memory, streamed block by block, or by brute force.

This layer knows numpy and FAISS only; the pipeline feeds it vectors read from a store::

    index = ExactIndex(dim)                 # on all GPUs when faiss has them, else CPU
    index.add(vectors)                      # [n, dim], rows numbered in add order
    scores, rows = index.search(queries, k) # [q, k'] float32, [q, k'] int64, best first

    scores, rows = search_blocks(store_blocks, queries, k)  # one block in memory at a time

Opponents are the top-k of the negated queries. Approximate indexes (``ApproxIndex``: any faiss
``index_factory`` string) are trained on a sample, filled block by block, and persisted with
``save_index`` / ``load_index`` (temporary name and rename; checked on load against ntotal, dim, metric).
"""

from __future__ import annotations

from ._approx import ApproxIndex, load_index, recall_at_k, save_index
from ._brute import brute_force_topk
from ._exact import ExactIndex, search_blocks
from ._faiss import configure_faiss, gpu_count

__all__ = [
    "ApproxIndex",
    "ExactIndex",
    "brute_force_topk",
    "configure_faiss",
    "gpu_count",
    "load_index",
    "recall_at_k",
    "save_index",
    "search_blocks",
]
