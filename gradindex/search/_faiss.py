"""How gradindex drives faiss: BLAS threshold, threads, GPUs, and faiss failures as our errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from gradindex.errors import GradIndexError, SearchError
from gradindex.utils import check_positive_int

__all__ = ["configure_faiss", "gpu_count"]

# faiss scans with its own SIMD loop below this threshold and with BLAS (sgemm) above it. What
# the threshold counts changed across faiss versions (the number of queries in older faiss, queries
# x dim in 1.15, queries x dim per thread in later work); 1 means "always BLAS" under each of them.
# Measured here (faiss-cpu 1.15.1, 2 cores, N=100k, d=1024) the default runs 100 queries ~4.6x slower.
_BLAS_THRESHOLD = 1

# faiss GPU flat search selects at most this many results per query (GPU_MAX_SELECTION_K);
# a larger k is answered on CPU rather than failing.
GPU_MAX_K = 2048

_NO_GPU_MESSAGE = (
    "use_gpu=True but faiss sees no GPU; install faiss-gpu (pip install 'gradindex[gpu]') or pass use_gpu=False"
)

_configured = False


def configure_faiss(n_threads: int | None = None) -> None:
    """Make faiss use BLAS even for small query batches; with ``n_threads``, also set its OpenMP threads.

    Idempotent. Called lazily (without ``n_threads``) the first time an index is made.
    """
    import faiss

    global _configured
    if n_threads is not None:
        faiss.omp_set_num_threads(check_positive_int("n_threads", n_threads))
    faiss.cvar.distance_compute_blas_threshold = _BLAS_THRESHOLD
    _configured = True


def ensure_configured() -> None:
    # Lazily, so that importing gradindex never changes faiss's global state, and so that a user's
    # own earlier configure_faiss(n_threads=...) is kept.
    if not _configured:
        configure_faiss()


def gpu_count() -> int:
    """The number of GPUs faiss can use: 0 on a faiss build without GPU support. Never raises."""
    import faiss

    # faiss-cpu has get_num_gpus() too (it returns 0), but no GPU classes; checking for them first
    # keeps a CPU build from ever reaching GPU code.
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return max(0, int(faiss.get_num_gpus()))
    except Exception:  # a broken CUDA driver must not break CPU search
        return 0


def resolve_gpus(use_gpu: bool | None) -> int:
    """How many GPUs to search on: all of them unless ``use_gpu`` is False; 0 means CPU."""
    if use_gpu not in (None, True, False):
        raise ValueError(f"use_gpu must be True, False or None, got {use_gpu!r}")
    if use_gpu is False:
        return 0
    n_gpus = gpu_count()
    if use_gpu and n_gpus == 0:
        raise SearchError(_NO_GPU_MESSAGE)
    return n_gpus


def gpu_resources(n_gpus: int) -> list[Any]:
    # Held by the caller for as long as its GPU indexes live: faiss's index_cpu_to_all_gpus makes
    # fresh resources (each reserving scratch memory) on every call and keeps no Python reference.
    import faiss

    with faiss_errors(f"setting up {n_gpus} GPU(s)"):
        return [faiss.StandardGpuResources() for _ in range(n_gpus)]


def to_gpus(cpu_index: Any, resources: list[Any]) -> Any:
    """Copy a CPU flat index onto the GPUs of ``resources``, its rows split evenly across them."""
    import faiss

    options = faiss.GpuMultipleClonerOptions()
    options.shard = True  # each GPU holds 1/n of the rows, so n GPUs hold n times more
    options.useFloat16 = False  # exact search: float16 storage would round the vectors
    with faiss_errors(f"copying {cpu_index.ntotal} vectors to {len(resources)} GPU(s)"):
        return faiss.index_cpu_to_gpu_multiple_py(resources, cpu_index, options)


@contextlib.contextmanager
def faiss_errors(doing: str) -> Iterator[None]:
    """Re-raise a faiss failure (a RuntimeError from its C++ side) as SearchError, saying what we were doing."""
    try:
        yield
    except GradIndexError:
        raise
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise SearchError(f"faiss failed while {doing}: {detail}") from err
