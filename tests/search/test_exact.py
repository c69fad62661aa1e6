"""Exact search: the faiss paths (ExactIndex, search_blocks) against the numpy brute force."""

from __future__ import annotations

import itertools

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradindex.errors import NonFiniteError, SearchError
from gradindex.search import ExactIndex, brute_force_topk, configure_faiss, gpu_count, search_blocks

# ---------------------------------------------------------------------------------------------
# helpers


def gaussian(seed: int, n_rows: int, dim: int, dtype=np.float32) -> np.ndarray:
    # Gaussian data has no exact ties, so the top-k rows are well defined.
    return np.random.default_rng(seed).standard_normal((n_rows, dim)).astype(dtype)


def assert_topk(scores, rows, vectors, queries, k, row_ids=None) -> None:
    """``(scores, rows)`` is a correct top-k of ``queries`` over ``vectors`` (row i of which has id ``row_ids[i]``).

    Checked so that near-ties cannot make it flaky: the scores match the brute force rank by rank;
    every returned row really has the score returned with it; no row comes twice; and where the
    brute-force scores are well separated, the rows are the brute force's exactly.
    """
    vectors64 = np.asarray(vectors, dtype=np.float64)
    queries64 = np.asarray(queries, dtype=np.float64)
    row_ids = np.arange(len(vectors64)) if row_ids is None else np.asarray(row_ids, dtype=np.int64)
    ref_scores, ref_positions = brute_force_topk(vectors, queries, k)
    ref_rows = row_ids[ref_positions]
    k_found = min(k, len(vectors64))
    assert scores.shape == rows.shape == (len(queries64), k_found)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    if k_found == 0:
        return
    atol = 1e-5 * queries64.shape[1]  # float32 dot products of gaussian data err far less
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=atol)
    assert (np.diff(scores, axis=1) <= 0).all(), "scores are not sorted highest first"
    position_of = np.full(int(row_ids.max()) + 1, -1)
    position_of[row_ids] = np.arange(len(row_ids))
    assert (position_of[rows] >= 0).all(), "a row that was not given came back"
    true_scores = np.einsum("qd,qkd->qk", queries64, vectors64[position_of[rows]])
    np.testing.assert_allclose(scores, true_scores, rtol=1e-5, atol=atol)
    for query_rows in rows:
        assert len(set(query_rows.tolist())) == k_found, "a row came back twice"
    gaps = np.abs(np.diff(ref_scores, axis=1))
    separated = np.ones_like(ref_scores, dtype=bool)
    separated[:, 1:] &= gaps > 4 * atol
    separated[:, :-1] &= gaps > 4 * atol
    np.testing.assert_array_equal(rows[separated], ref_rows[separated])


def split_blocks(n_rows: int, cuts, seed: int) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``range(n_rows)``, cut at ``cuts``, in shuffled order."""
    edges = sorted({0, n_rows, *(c for c in cuts if 0 < c < n_rows)})
    ranges = list(itertools.pairwise(edges))
    order = np.random.default_rng(seed).permutation(len(ranges))
    return [ranges[i] for i in order]


# ---------------------------------------------------------------------------------------------
# ExactIndex against brute force


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize(
    ("n_rows", "dim", "k"),
    [(1, 3, 1), (1, 3, 5), (50, 16, 10), (200, 32, 500), (1000, 64, 100), (3000, 128, 7)],
)
def test_exact_index_matches_brute_force(dtype, n_rows, dim, k):
    vectors = gaussian(0, n_rows, dim, dtype)
    queries = gaussian(1, 9, dim, dtype)
    index = ExactIndex(dim, use_gpu=False)
    index.add(vectors[: n_rows // 3])  # rows are numbered across several add() calls
    index.add(vectors[n_rows // 3 :])
    assert (index.ntotal, index.dim, index.on_gpu) == (n_rows, dim, False)
    scores, rows = index.search(queries, k)
    assert_topk(scores, rows, vectors, queries, k)


def test_exact_index_accepts_non_contiguous_and_chunked_input(monkeypatch):
    monkeypatch.setattr("gradindex.search._arrays.CHUNK_BYTES", 1024)  # force many conversion chunks
    wide = gaussian(2, 700, 64, np.float64)
    vectors = wide[:, ::2]  # strided float64: converted chunk by chunk through the buffer
    queries = np.asfortranarray(gaussian(3, 5, 32, np.float64))
    index = ExactIndex(32, use_gpu=False)
    index.add(vectors)
    index.add(np.asfortranarray(vectors[:10]))
    scores, rows = index.search(queries, 20)
    assert_topk(scores, rows, np.vstack([vectors, vectors[:10]]), queries, 20)


def test_opponents_are_the_top_k_of_negated_queries():
    vectors = gaussian(4, 2000, 48)
    queries = gaussian(5, 6, 48)
    index = ExactIndex(48, use_gpu=False)
    index.add(vectors)
    scores, rows = index.search(-queries, 15)
    assert_topk(scores, rows, vectors, -queries, 15)
    # the opponents' true influence is negative: the lowest inner products with the query
    np.testing.assert_allclose(-scores, np.sort(queries @ vectors.T, axis=1)[:, :15], rtol=1e-5, atol=1e-3)


def test_empty_index_and_empty_queries_give_empty_results():
    index = ExactIndex(8, use_gpu=False)
    scores, rows = index.search(gaussian(6, 3, 8), 5)
    assert scores.shape == rows.shape == (3, 0)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    index.add(gaussian(7, 4, 8))
    scores, rows = index.search(np.empty((0, 8), np.float32), 5)
    assert scores.shape == rows.shape == (0, 4)
    index.add(np.empty((0, 8), np.float16))
    assert index.ntotal == 4


def test_equal_scores_come_in_row_order():
    vectors = np.ones((6, 4), np.float32)  # every row scores the same
    index = ExactIndex(4, use_gpu=False)
    index.add(vectors)
    _, rows = index.search(np.ones((2, 4), np.float32), 6)
    np.testing.assert_array_equal(rows, [[0, 1, 2, 3, 4, 5]] * 2)
    _, block_rows = search_blocks([(3, vectors[3:]), (0, vectors[:3])], np.ones((2, 4)), 6)
    np.testing.assert_array_equal(block_rows, rows)


# ---------------------------------------------------------------------------------------------
# search_blocks against ExactIndex and brute force


@pytest.mark.parametrize("seed", range(4))
def test_search_blocks_in_shuffled_order_matches_exact_index(seed):
    rng = np.random.default_rng(seed)
    n_rows, dim, k = 2500, 40, int(rng.integers(1, 60))
    vectors = gaussian(seed, n_rows, dim, np.float16 if seed % 2 else np.float32)
    queries = gaussian(100 + seed, 11, dim)
    blocks = split_blocks(n_rows, rng.integers(0, n_rows, size=7), seed)
    index = ExactIndex(dim, use_gpu=False)
    index.add(vectors)
    expected_scores, expected_rows = index.search(queries, k)
    scores, rows = search_blocks(((a, vectors[a:b]) for a, b in blocks), queries, k, use_gpu=False)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-4)
    assert_topk(scores, rows, vectors, queries, k)
    assert_topk(expected_scores, expected_rows, vectors, queries, k)


def test_search_blocks_never_returns_rows_that_were_not_given():
    vectors = gaussian(8, 1000, 24)
    queries = gaussian(9, 4, 24)
    given = [(600, 800), (0, 100), (300, 450)]
    scores, rows = search_blocks(((a, vectors[a:b]) for a, b in given), queries, 30)
    row_ids = np.concatenate([np.arange(a, b) for a, b in given])
    assert_topk(scores, rows, vectors[row_ids], queries, 30, row_ids=row_ids)


def test_search_blocks_trims_to_the_rows_given():
    vectors = gaussian(10, 7, 5)
    queries = gaussian(11, 3, 5)
    scores, rows = search_blocks([(40, vectors[4:]), (10, vectors[:4])], queries, 50)
    assert scores.shape == rows.shape == (3, 7)
    assert (rows >= 0).all()
    assert_topk(scores, rows, vectors, queries, 50, row_ids=[10, 11, 12, 13, 40, 41, 42])
    scores, rows = search_blocks([], queries, 5)
    assert scores.shape == rows.shape == (3, 0)
    scores, rows = search_blocks([(0, vectors)], np.empty((0, 5)), 5)
    assert scores.shape == rows.shape == (0, 5)


@settings(max_examples=60, deadline=None)
@given(
    n_rows=st.integers(0, 60),
    dim=st.integers(1, 12),
    n_queries=st.integers(1, 5),
    k=st.integers(1, 80),
    cuts=st.lists(st.integers(0, 60), max_size=8),
    kept=st.lists(st.booleans(), min_size=9, max_size=9),
    offset=st.integers(0, 1000),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
)
def test_search_blocks_matches_brute_force_property(n_rows, dim, n_queries, k, cuts, kept, offset, seed, dtype):
    vectors = gaussian(seed, n_rows, dim, dtype)
    queries = gaussian(seed + 1, n_queries, dim, dtype)
    blocks = [(a, b) for (a, b), keep in zip(split_blocks(n_rows, cuts, seed), kept) if keep]
    scores, rows = search_blocks(((offset + a, vectors[a:b]) for a, b in blocks), queries, k)
    positions = np.concatenate([np.arange(a, b) for a, b in blocks]) if blocks else np.arange(0)
    assert_topk(scores, rows, vectors[positions], queries, k, row_ids=offset + positions)


# ---------------------------------------------------------------------------------------------
# errors


def test_k_must_be_positive():
    index = ExactIndex(4, use_gpu=False)
    index.add(gaussian(12, 3, 4))
    queries = gaussian(13, 2, 4)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        index.search(queries, 0)
    with pytest.raises(ValueError, match="k must be a positive integer, got -2"):
        search_blocks([(0, gaussian(14, 3, 4))], queries, -2)
    with pytest.raises(ValueError, match="k must be a positive integer, got 1.5"):
        brute_force_topk(gaussian(14, 3, 4), queries, 1.5)


def test_dimension_mismatch_names_both_dimensions():
    index = ExactIndex(16, use_gpu=False)
    with pytest.raises(ValueError, match="vectors have dimension 12 but the index has dimension 16"):
        index.add(gaussian(15, 3, 12))
    index.add(gaussian(15, 3, 16))
    with pytest.raises(ValueError, match="queries have dimension 12 but the index has dimension 16"):
        index.search(gaussian(16, 2, 12), 3)
    with pytest.raises(ValueError, match="block at row 5 have dimension 12 but the queries have dimension 16"):
        search_blocks([(5, gaussian(17, 3, 12))], gaussian(18, 2, 16), 3)
    with pytest.raises(ValueError, match=r"2-D array \[rows, dim\], got shape \(16,\)"):
        index.search(np.zeros(16, np.float32), 3)
    with pytest.raises(ValueError, match="must be float16, float32 or float64, got int64"):
        index.add(np.zeros((2, 16), np.int64))


def test_non_finite_rows_are_counted_and_nothing_is_added(monkeypatch):
    monkeypatch.setattr("gradindex.search._arrays.CHUNK_BYTES", 256)  # bad rows fall in different chunks
    index = ExactIndex(8, use_gpu=False)
    index.add(gaussian(19, 5, 8))
    vectors = gaussian(20, 100, 8)
    vectors[[7, 50, 93], 2] = [np.nan, np.inf, -np.inf]
    with pytest.raises(NonFiniteError, match=r"3 of 100 vectors hold NaN or infinite.*first is row 7"):
        index.add(vectors)
    assert index.ntotal == 5  # the rejected call added nothing
    late = gaussian(24, 100, 8)
    late[93, 0] = np.nan  # in a later chunk: the chunks before it were added, then taken back
    with pytest.raises(NonFiniteError, match=r"1 of 100 vectors hold NaN or infinite.*first is row 93"):
        index.add(late)
    assert index.ntotal == 5
    scores, rows = index.search(gaussian(25, 3, 8), 5)
    assert_topk(scores, rows, gaussian(19, 5, 8), gaussian(25, 3, 8), 5)
    too_large = gaussian(20, 100, 8, np.float64)
    too_large[3, 1] = 1e300  # finite as float64, inf as float32
    with pytest.raises(ValueError, match="1 of 100 vectors hold NaN or infinite"):
        index.add(too_large)
    queries = gaussian(21, 4, 8)
    queries[2, 0] = np.nan
    with pytest.raises(NonFiniteError, match="1 of 4 queries hold NaN or infinite"):
        index.search(queries, 3)
    with pytest.raises(NonFiniteError, match=r"3 of 100 rows of the block at row 1000 .*first is row 1007"):
        search_blocks([(0, gaussian(22, 5, 8)), (1000, vectors)], gaussian(23, 2, 8), 3)


def test_overlapping_blocks_are_refused():
    vectors = gaussian(24, 10, 4)
    with pytest.raises(ValueError, match="block at row 5 .* overlaps rows given by an earlier block"):
        search_blocks([(0, vectors), (5, vectors)], gaussian(25, 2, 4), 3)
    with pytest.raises(ValueError, match="first row must be a non-negative integer, got -1"):
        search_blocks([(-1, vectors)], gaussian(25, 2, 4), 3)


def test_overflowing_inner_products_raise_search_error():
    index = ExactIndex(2, use_gpu=False)
    index.add(np.full((3, 2), 1e20, np.float32))
    with pytest.raises(SearchError, match="overflow float32"):
        index.search(np.full((1, 2), -1e20, np.float32), 2)


def test_faiss_runtime_errors_become_search_errors(monkeypatch):
    class BrokenIndex(faiss.IndexFlatIP):
        def search(self, *args, **kwargs):
            raise RuntimeError("Error in faiss::IndexFlat::search: out of memory")

    def broken_knn(*args, **kwargs):
        raise RuntimeError("Error in faiss::knn_inner_product: out of memory")

    monkeypatch.setattr(faiss, "IndexFlatIP", BrokenIndex)
    monkeypatch.setattr(faiss, "knn", broken_knn)  # search_blocks searches each block in place on CPU
    index = ExactIndex(4, use_gpu=False)
    index.add(gaussian(26, 3, 4))
    with pytest.raises(SearchError, match="faiss failed while searching 2 queries .*: Error in faiss.*out of memory"):
        index.search(gaussian(27, 2, 4), 2)
    with pytest.raises(
        SearchError, match="faiss failed while searching 2 queries .*: Error in faiss::knn.*out of memory"
    ):
        search_blocks([(0, gaussian(26, 3, 4))], gaussian(27, 2, 4), 2)


@pytest.mark.skipif(gpu_count() > 0, reason="checks the message for machines without a GPU")
def test_use_gpu_true_without_a_gpu_says_how_to_fix():
    message = (
        r"use_gpu=True but faiss sees no GPU; install faiss-gpu \(pip install 'gradindex\[gpu\]'\) "
        r"or pass use_gpu=False"
    )
    with pytest.raises(SearchError, match=message):
        ExactIndex(4, use_gpu=True)
    with pytest.raises(SearchError, match=message):
        search_blocks([(0, gaussian(28, 3, 4))], gaussian(29, 1, 4), 2, use_gpu=True)
    assert ExactIndex(4).on_gpu is False  # use_gpu=None falls back to CPU quietly


# ---------------------------------------------------------------------------------------------
# faiss set-up


def test_configure_faiss_sets_blas_threshold_and_threads():
    threads, threshold = faiss.omp_get_max_threads(), faiss.cvar.distance_compute_blas_threshold
    try:
        configure_faiss(n_threads=1)
        configure_faiss(n_threads=1)  # idempotent
        assert faiss.omp_get_max_threads() == 1
        assert faiss.cvar.distance_compute_blas_threshold == 1
        with pytest.raises(ValueError, match="n_threads must be a positive integer, got 0"):
            configure_faiss(n_threads=0)
    finally:
        faiss.omp_set_num_threads(threads)
        faiss.cvar.distance_compute_blas_threshold = threshold


def test_gpu_count_never_raises(monkeypatch):
    assert gpu_count() >= 0

    def broken() -> int:
        raise RuntimeError("CUDA driver version is insufficient")

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", broken)
    assert gpu_count() == 0


# ---------------------------------------------------------------------------------------------
# GPU paths: with two simulated GPUs on CPU, and on real GPUs when there are any


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """Two "GPUs" that are CPU IndexShards: the same sharded index (successive ids, a single add()
    allowed) that faiss's cloner builds for a flat index over several GPUs."""
    clones = []

    class Options:
        shard = False
        useFloat16 = True

    def clone(resources, cpu_index, options):
        assert options.shard and not options.useFloat16
        shards = faiss.IndexShards(cpu_index.d, True, True)
        stored = cpu_index.reconstruct_n(0, cpu_index.ntotal) if cpu_index.ntotal else None
        for i in range(len(resources)):
            shard = faiss.IndexFlat(cpu_index.d, cpu_index.metric_type)
            lo, hi = cpu_index.ntotal * i // len(resources), cpu_index.ntotal * (i + 1) // len(resources)
            if hi > lo:
                shard.add(stored[lo:hi])
            shards.add_shard(shard)
        clones.append(cpu_index.ntotal)
        return shards

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", Options, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu_multiple_py", clone, raising=False)
    return clones


def test_sharded_gpu_paths_match_brute_force(two_fake_gpus):
    vectors = gaussian(30, 3000, 32)
    queries = gaussian(31, 7, 32)
    index = ExactIndex(32)
    assert index.on_gpu
    index.add(vectors[:1000])
    assert_topk(*index.search(queries, 10), vectors[:1000], queries, 10)
    index.add(vectors[1000:])  # a sharded index takes one add(): the GPU copy is re-made
    assert_topk(*index.search(queries, 10), vectors, queries, 10)
    assert_topk(*index.search(queries, 5), vectors, queries, 5)
    assert two_fake_gpus == [1000, 3000]  # re-made only when rows were added
    assert_topk(*index.search(queries, 2500), vectors, queries, 2500)  # beyond GPU k: CPU
    assert two_fake_gpus == [1000, 3000]
    blocks = split_blocks(3000, [700, 1500, 2900], 0)
    scores, rows = search_blocks(((a, vectors[a:b]) for a, b in blocks), queries, 10)
    assert_topk(scores, rows, vectors, queries, 10)
    assert two_fake_gpus[2:] == [0]  # one empty index, reset and refilled per block


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="faiss sees no GPU")
def test_gpu_results_equal_cpu_results():
    vectors = gaussian(32, 20000, 256, np.float16)
    queries = gaussian(33, 50, 256)
    cpu, gpu = ExactIndex(256, use_gpu=False), ExactIndex(256, use_gpu=True)
    for index in (cpu, gpu):
        index.add(vectors[:5000])
        index.add(vectors[5000:])
    assert gpu.on_gpu
    cpu_scores, _cpu_rows = cpu.search(queries, 100)
    gpu_scores, gpu_rows = gpu.search(queries, 100)
    np.testing.assert_allclose(gpu_scores, cpu_scores, rtol=1e-4, atol=1e-3)
    assert_topk(gpu_scores, gpu_rows, vectors, queries, 100)
    blocks = [(a, vectors[a : a + 3000]) for a in range(0, 20000, 3000)][::-1]
    assert_topk(*search_blocks(blocks, queries, 100, use_gpu=True), vectors, queries, 100)


def test_reserving_room_keeps_the_rows_and_their_order():
    vectors, queries = gaussian(30, 100, 16), gaussian(31, 4, 16)
    index = ExactIndex(16, use_gpu=False)
    index.reserve(100)
    index.add(vectors[:30])
    index.reserve(10)  # less than there is: nothing changes
    index.add(vectors[30:70])
    index.reserve(500)  # more, after rows were added: they stay
    index.add(vectors[70:])
    assert index.ntotal == 100
    scores, rows = index.search(queries, 7)
    assert_topk(scores, rows, vectors, queries, 7)
    with pytest.raises(ValueError, match="n_rows must be a positive integer"):
        index.reserve(0)
