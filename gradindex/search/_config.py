"""The settings of search that the command line builds its options from, and their checks: light on purpose (no
faiss, no numpy, no zarr)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gradindex.errors import ArgumentError
from gradindex.utils import check_settings, setting

__all__ = ["INDEX_NAME", "IndexConfig", "check_index_name", "check_search_options"]

# what a persisted index may be called (it names files under the store's indexes/)
INDEX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def check_index_name(name: str) -> str:
    """``name`` when it can name a persisted index; else a ValueError saying what names may be."""
    if not isinstance(name, str) or not INDEX_NAME.match(name):
        raise ValueError(
            f"index name {name!r} must be 1-100 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


def check_search_options(index: str | None, nprobe: int | None, dask: Any) -> None:
    """The ways to search that go together: nprobe needs an index; an index and Dask together spread the index's
    lists over the workers (an IVF index)."""
    if nprobe is not None and index is None:
        raise ArgumentError(
            "nprobe", "nprobe applies to a search through a persisted index; give index=NAME too", also=["index"]
        )


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """How an approximate index is built and how its recall is measured. ``build_index(store, factory, **options)``
    takes these as keywords and checks them here."""

    factory: str = setting(
        help='a faiss index_factory string, e.g. "IVF4096,SQfp16", "IVF,PQ64" or "HNSW32" (IVF alone: nlist ≈ 4√N)',
        metavar="FACTORY",
    )
    name: str | None = setting(
        None, "the index's name", optional=True, default_text="from the factory, e.g. ivf4096-sqfp16", metavar="NAME"
    )
    k: int = setting(10, "the k of the recall@k measured", minimum=1, integer=True)
    recall_queries: int = setting(200, "held-out store rows recall is measured on", minimum=1, integer=True)
    target_recall: float = setting(0.95, "recall the default nprobe (HNSW: efSearch) must reach", above=0, maximum=1)
    train_size: int | None = setting(
        None,
        "rows the index is trained on",
        minimum=1,
        integer=True,
        optional=True,
        default_text="what the factory wants, within half the memory budget",
    )
    on_disk: bool = setting(
        False, "keep the IVF lists in a file beside the index (faiss contrib.ondisk), not in memory"
    )
    use_gpu: bool | None = setting(
        None, "train and search on all GPUs", flag=True, optional=True, default_text="when faiss has GPUs", cli=False
    )
    memory_budget: int | None = setting(
        None,
        "bytes the training sample may use (half of it)",
        minimum=1,
        integer=True,
        optional=True,
        default_text="a quarter of memory, at most 8G",
        metavar="SIZE",
    )
    overwrite: bool = setting(False, "replace an index of the same name")
    seed: int = setting(0, "seed of the training and held-out samples", minimum=0, integer=True)
    dask: Any = setting(
        None,
        "fill the IVF lists on Dask workers in parallel: a scheduler address (tcp://host:8786) or local:N",
        optional=True,
        metavar="ADDRESS",
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if self.name is not None:
            check_index_name(self.name)
