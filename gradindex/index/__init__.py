"""Exact inner-product search with FAISS: in memory, streamed block by block, or by brute force.

This layer knows numpy and FAISS only; the pipeline feeds it vectors read from a store::

    index = ExactIndex(dim)                 # on all GPUs when faiss has them, else CPU
    index.add(vectors)                      # [n, dim], rows numbered in add order
    scores, rows = index.search(queries, k) # [q, k'] float32, [q, k'] int64, best first

    scores, rows = search_blocks(store_blocks, queries, k)  # one block in memory at a time

Opponents are the top-k of the negated queries.
"""

from __future__ import annotations

from ._brute import brute_force_topk
from ._exact import ExactIndex, search_blocks
from ._faiss import configure_faiss, gpu_count

__all__ = ["ExactIndex", "brute_force_topk", "configure_faiss", "gpu_count", "search_blocks"]
