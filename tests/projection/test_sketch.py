"""Wide pca sides from a one-pass randomized sketch: the top subspace of exact eigh where the spectrum has a gap, the
trace kept for the plan's spectra, the same sides every time, and a build whose wide sides are sketched."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from featurize import kron_models
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import gradindex
from gradindex.projection import (
    SideSketch,
    exact_side_eigen,
    exact_width,
    pca_side_matrix,
    sketch_rank,
    top_eigen,
    torch_threads,
)


def _gapped(width: int, n: int, strong: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``[n, width]`` whose weighted moment has ``strong`` large eigenvalues, then a decaying tail (a gap
    of ~25x), and their weights ``[n]``."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
    scales = torch.cat([torch.linspace(40, 25, strong), 1.0 / (1.0 + torch.arange(width - strong))]).double()
    rows = (torch.randn(n, width, generator=generator, dtype=torch.float64) * scales.sqrt()) @ basis.T
    return rows, torch.rand(n, generator=generator, dtype=torch.float64) + 0.5


def _principal_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The smallest cosine of the principal angles between the column spans of ``a`` and ``b`` (1: the same span)."""
    return float(torch.linalg.svdvals(torch.linalg.qr(a.double())[0].T @ torch.linalg.qr(b.double())[0]).min())


def _cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def test_sketched_sides_span_the_exact_top_subspace():
    width, strong = 700, 12
    rows, weights = _gapped(width, 900, strong)
    moment = (rows * weights[:, None]).T @ rows
    exact = exact_side_eigen(moment)
    assert not exact_width(width, sketch_rank(width, 1024))  # a side this wide is sketched in a build
    sketch = SideSketch(width, sketch_rank(width, 1024), seed=7)
    for start in range(0, len(rows), 128):  # streamed in batches, float32 products, never the [width, width] moment
        sketch.add(rows[start : start + 128].float(), weights[start : start + 128].float())
    found = sketch.eigen()
    for k in (4, strong):
        assert _principal_cosine(found.matrix(k), exact.matrix(k)) > 0.9999
        # the same columns (signs fixed the same way), not only the same span
        torch.testing.assert_close(found.matrix(k), exact.matrix(k), atol=5e-3, rtol=0)
    torch.testing.assert_close(found.values[:strong], exact.values[:strong], rtol=2e-3, atol=0)
    assert abs(found.trace - exact.trace) < 1e-5 * exact.trace
    # the plan's spectrum: the kept eigenvalues, then the rest of the trace spread evenly, never increasing
    spectrum = found.spectrum()
    assert len(spectrum) == width and 0.99 * exact.trace < sum(spectrum) <= exact.trace * (1 + 1e-6)
    assert all(a >= b for a, b in itertools.pairwise(spectrum))
    # a formed wide moment: randomized subspace iteration, the exact top subspace too
    iterated = top_eigen(moment, strong, seed=3)
    torch.testing.assert_close(iterated.matrix(strong), exact.matrix(strong), atol=1e-6, rtol=0)
    torch.testing.assert_close(pca_side_matrix(moment, strong), exact.matrix(strong), atol=1e-6, rtol=0)
    # a narrow moment stays exact: the same matrix eigh gives
    narrow = moment[:100, :100]
    assert torch.equal(pca_side_matrix(narrow, 5), exact_side_eigen(narrow).matrix(5))


def test_a_sketch_is_the_same_for_the_same_seed_whatever_the_batches():
    rows, weights = _gapped(500, 300, 6, seed=1)
    rows, weights = rows.float(), weights.float()

    def sketched(seed: int, batch: int):
        sketch = SideSketch(500, 100, seed)
        for start in range(0, len(rows), batch):
            sketch.add(rows[start : start + batch], weights[start : start + batch])
        return sketch.eigen()

    first, again = sketched(5, 64), sketched(5, 64)
    assert torch.equal(first.vectors, again.vectors) and torch.equal(first.values, again.values)
    torch.testing.assert_close(sketched(5, 300).matrix(6), first.matrix(6), atol=1e-5, rtol=0)
    other = sketched(6, 64)  # another Ω: the same top directions, not the same bits
    assert not torch.equal(first.vectors, other.vectors)
    torch.testing.assert_close(first.matrix(6), other.matrix(6), atol=1e-3, rtol=0)
    # a side that never ran: an orthonormal matrix all the same
    empty = SideSketch(500, 100, 5).eigen()
    torch.testing.assert_close(empty.matrix(8).T @ empty.matrix(8), torch.eye(8), atol=1e-6, rtol=0)


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_a_build_with_wide_sides_is_reproducible_and_tracks_exact_scores(tmp_path):
    """An MLP whose hidden side (640) is sketched: two builds give the same bytes; the sides are orthonormal; scores
    follow the exact ones."""
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(96, 24, generator=generator), torch.randint(0, 5, (96,), generator=generator)

    def model():
        return nn.Sequential(nn.Linear(24, 640), nn.Tanh(), nn.Linear(640, 5))

    task = gradindex.Task(model=model, train=TensorDataset(inputs, labels), loss=_cross_entropy)
    checkpoint = kron_models.trained_checkpoint(task, tmp_path / "wide.pt", steps=30)
    options = {"proj_dim": 96, "dtype": "float32", "rows_per_shard": 48}
    first = gradindex.build(task, [checkpoint], tmp_path / "a.gradindex", **options)
    second = gradindex.build(task, [checkpoint], tmp_path / "b.gradindex", **options)
    plan = first.fingerprint["projection"]["plan"]
    assert plan == second.fingerprint["projection"]["plan"]
    assert any(
        entry.get("sides") == "pca" and entry["k_out"] < entry["out"] == 640 for entry in plan if "module" in entry
    )
    np.testing.assert_array_equal(first.read_transform("kron_sides"), second.read_transform("kron_sides"))
    np.testing.assert_array_equal(first.read_features(), second.read_features())
    exact = gradindex.build(task, [checkpoint], tmp_path / "exact.gradindex", projection="none", dtype="float32")
    projected, truth = first.read_features(), exact.read_features()
    scores, expected = projected[:8] @ projected.T, truth[:8] @ truth.T
    correlation = np.mean([np.corrcoef(scores[q], expected[q])[0, 1] for q in range(8)])
    assert correlation > 0.97
