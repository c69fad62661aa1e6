"""The settings of the pipeline's stages: ``BuildConfig`` (what a build computes and how) and ``QueryConfig`` (how a
query is answered). Light on purpose (no torch, no faiss): the command line builds its options from them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gradindex.errors import ArgumentError
from gradindex.methods import METHODS
from gradindex.projection import KRON_SIDES, PROJECTION_KINDS, ProjectionSpec
from gradindex.search import check_search_options
from gradindex.store import STORE_DTYPES
from gradindex.utils import check_settings, setting

__all__ = ["NONFINITE_POLICIES", "BuildConfig", "QueryConfig", "rank_device"]


# What a build does with a sample whose vector is NaN or infinite.
NONFINITE_POLICIES: dict[str, str] = {
    "error": "stop; nothing is written for its shard (finished shards are kept)",
    "skip": "store a zero vector, list the row in the manifest and leave it out of search and self-influence",
    "zero": "store a zero vector, list the row in the manifest and keep it in search",
}


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """What a build computes (fingerprinted: method, projection, layers, normalize, dtype) and how (batching, device,
    layout, working memory). Every field is checked on construction; ``build(**options)`` takes these as keywords."""

    method: str = setting("tracin", "how vectors are made", choices=METHODS)
    projection: str | None = setting(
        None,
        "projection kind",
        choices=PROJECTION_KINDS,
        optional=True,
        default_text="kron for tracin, rademacher otherwise",
    )
    proj_dim: int = setting(1024, "projected dimension per checkpoint", minimum=1, integer=True)
    kron_sides: str | None = setting(
        None, "how kron projects each narrow layer side", choices=KRON_SIDES, optional=True, default_text="pca"
    )
    seed: int = setting(0, "projection seed", minimum=0, integer=True)
    layers: tuple[str, ...] | None = setting(
        None, "only parameters whose names match one of these globs, e.g. 'fc2.*'", optional=True, metavar="GLOB"
    )
    normalize: bool = setting(False, "unit-normalise each checkpoint's vector (cosine scores)")
    dtype: str = setting("float16", "stored vector dtype", choices=STORE_DTYPES)
    batch_size: int | None = setting(
        None,
        "samples per batch",
        minimum=1,
        integer=True,
        optional=True,
        default_text="as many as fit the featurization memory (kron; on a CPU at most 32 MiB, at least 256), else 256",
    )
    device: str = setting("auto", "auto, cpu or cuda[:N]")
    rows_per_shard: int | None = setting(
        None, "rows per shard", minimum=1, integer=True, optional=True, default_text="about 64 MiB of vectors"
    )
    method_options: dict = setting(
        default_factory=dict, help="options of the method (gradindex.methods.METHOD_OPTIONS)", cli=False
    )
    nonfinite: str = setting("error", "what to do with a NaN/inf vector", choices=NONFINITE_POLICIES)
    # how featurization runs (not fingerprinted): working memory per chunk, torch.compile, CUDA bfloat16 autocast
    featurize_memory: int = setting(
        512 << 20, "working memory of one featurization chunk, in bytes", minimum=1, integer=True, default_text="512M"
    )
    compile: bool = setting(False, "torch.compile the kron projection kernels")
    autocast: bool = setting(False, "on CUDA: forward/backward in bfloat16 (projections stay float32); ignored on CPU")

    def __post_init__(self) -> None:
        if self.layers is not None and not isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple([self.layers] if isinstance(self.layers, str) else self.layers))
        check_settings(self)
        if self.projection is None:
            object.__setattr__(self, "projection", "kron" if self.method == "tracin" else ProjectionSpec().kind)
        self.projection_spec()  # checks what belongs together (kron_sides with kron)

    def projection_spec(self) -> ProjectionSpec:
        return ProjectionSpec(kind=self.projection, dim=self.proj_dim, seed=self.seed, kron_sides=self.kron_sides)


@dataclass(frozen=True, kw_only=True)
class QueryConfig:
    """How a query is answered: which samples of which split, how many results, and how the store is searched.
    ``query(**options)`` takes these as keywords and checks them here."""

    split: str = setting("test", "query split of the task (train, test or a key of Task.queries)")
    k: int = setting(10, "results per query", minimum=1, integer=True)
    opponents: bool = setting(False, "the most negative influence instead of the most positive")
    device: str = setting("auto", "auto, cpu or cuda[:N]")
    batch_size: int = setting(256, "query samples featurized per batch", minimum=1, integer=True)
    memory_budget: int | None = setting(
        None,
        "bytes exact search may hold; a larger store streams in blocks that fit (pieces of shards if need be)",
        minimum=0,
        integer=True,
        optional=True,
        default_text="a quarter of memory, at most 8G",
        metavar="SIZE",
    )
    allow_incomplete: bool = setting(False, "search the finished part of an incomplete store")
    index: str | None = setting(
        None,
        "search the persisted approximate index NAME (gradindex index) instead of exact search",
        optional=True,
        metavar="NAME",
    )
    nprobe: int | None = setting(
        None,
        "with index: IVF lists probed (HNSW: efSearch)",
        minimum=1,
        integer=True,
        optional=True,
        default_text="the value reaching the index's target recall",
    )
    dask: Any = setting(
        None,
        "spread search over Dask workers (exact; with index, the IVF index's lists): a scheduler address "
        "(tcp://host:8786) or local:N",
        optional=True,
        metavar="ADDRESS",
    )

    def __post_init__(self) -> None:
        check_settings(self)
        check_search_options(self.index, self.nprobe, self.dask)


def rank_device(device: str, environ: Mapping[str, str] | None = None, cuda_count: int | None = None) -> str:
    """The device this build process uses: one GPU per torchrun rank. Under torchrun (``LOCAL_RANK`` set), ``cuda``
    becomes ``cuda:LOCAL_RANK``, and so does ``auto`` when torch sees CUDA devices; ``cpu``, ``cuda:N`` and ``auto``
    without CUDA are kept as asked (``resolve_device`` then checks them).

    Args:
        device: the device asked for: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        environ: the environment to read ``LOCAL_RANK`` from (default: ``os.environ``).
        cuda_count: CUDA devices torch sees (default: ``torch.cuda.device_count()``, asked only under torchrun).

    Returns:
        The device to resolve, e.g. ``"cuda:3"`` on the fourth rank of a node.

    Raises:
        ArgumentError: ``LOCAL_RANK`` is not a non-negative integer, or names a GPU the node does not have.
    """
    local_rank = (os.environ if environ is None else environ).get("LOCAL_RANK")
    if local_rank is None or device not in ("auto", "cuda"):
        return device
    if not local_rank.isdigit():
        raise ArgumentError("device", f"LOCAL_RANK must be a non-negative integer, got {local_rank!r}")
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_count == 0:
        return device  # auto: the CPU; cuda: resolve_device says torch sees no CUDA device
    if int(local_rank) >= cuda_count:
        raise ArgumentError(
            "device",
            f"torchrun's LOCAL_RANK={local_rank} names GPU {local_rank}, but torch sees {cuda_count} CUDA device(s) "
            f"on this node; launch at most {cuda_count} processes per node (--nproc-per-node {cuda_count})",
        )
    return f"cuda:{local_rank}"
