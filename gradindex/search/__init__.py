"""Search: FAISS inner-product top-k over vectors, over a whole store, through persisted indexes, across Dask workers.

The engines know numpy and FAISS only::

    index = ExactIndex(dim)                 # on all GPUs when faiss has them, else CPU
    index.add(vectors)                      # [n, dim], rows numbered in add order
    scores, rows = index.search(queries, k) # [q, k'] float32, [q, k'] int64, best first

    scores, rows = search_blocks(store_blocks, queries, k)  # one block in memory at a time

Over a store (read through its public API, never Zarr directly): ``search_store`` searches exactly, in memory or
streamed shard by shard; ``build_index`` trains and persists an approximate index (any faiss ``index_factory``
string) under the store's ``indexes/`` with its recall measured; ``DaskSearch`` spreads exact search over Dask
workers, ``DaskIndexSearch`` a persisted IVF index's lists (``build_index(..., dask=...)`` fills them there in
parallel); both survive a lost worker. Opponents are the top-k of the negated queries; an index's recall is measured
for both directions, each with its own nprobe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradindex.search._config import IndexConfig, check_search_options
from gradindex.utils import lazy_exports

__all__ = [
    "ApproxIndex",
    "DaskIndexSearch",
    "DaskSearch",
    "ExactIndex",
    "IndexConfig",
    "OnDiskListsWriter",
    "brute_force_topk",
    "build_index",
    "check_search_options",
    "clear_index_cache",
    "configure_faiss",
    "default_index_name",
    "default_nlist",
    "drop_index",
    "gpu_count",
    "index_files",
    "index_names",
    "least_memory_budget",
    "list_indexes",
    "load_index",
    "loaded_index",
    "merge_topk",
    "read_index_meta",
    "recall_at_k",
    "resolve_factory",
    "save_index",
    "search_blocks",
    "search_index",
    "search_index_dask",
    "search_store",
    "search_store_dask",
    "store_content_id",
    "streaming_plan",
    "update_indexes",
    "write_index_meta",
]

# the engines load with their first use (faiss itself only when an index is made or searched), so that IndexConfig
# and listing a store's indexes stay light
if TYPE_CHECKING:  # loaded on first use (lazy_exports)
    from gradindex.search._approx import (
        ApproxIndex,
        OnDiskListsWriter,
        default_index_name,
        default_nlist,
        index_files,
        index_names,
        load_index,
        read_index_meta,
        recall_at_k,
        resolve_factory,
        save_index,
        write_index_meta,
    )
    from gradindex.search._brute import brute_force_topk
    from gradindex.search._dask import DaskSearch, merge_topk, search_store_dask
    from gradindex.search._exact import ExactIndex, search_blocks
    from gradindex.search._faiss import configure_faiss, gpu_count
    from gradindex.search._persisted import (
        DaskIndexSearch,
        build_index,
        clear_index_cache,
        drop_index,
        list_indexes,
        loaded_index,
        search_index,
        search_index_dask,
        store_content_id,
        update_indexes,
    )
    from gradindex.search._store_search import least_memory_budget, search_store, streaming_plan

__getattr__, __dir__ = lazy_exports(__name__)
