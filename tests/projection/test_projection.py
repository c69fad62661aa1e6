"""Projections: deterministic from (seed, checkpoint, parameter), blockwise equal to whole, norm-preserving."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradindex.projection import DenseProjector, ParamPlan, ProjectionSpec, SJLTProjector, make_projector

PLANS = ParamPlan.layout([("a.weight", (30, 20)), ("a.bias", (30,)), ("b.weight", (5, 30))])
P = sum(plan.numel for plan in PLANS)


def _grads(batch=6, seed=0):
    return torch.randn(batch, P, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sjlt"])
def test_same_spec_same_projection_in_a_fresh_projector(kind):
    spec = ProjectionSpec(kind=kind, dim=64, seed=7)
    grads = _grads()
    torch.manual_seed(123)  # global RNG must not matter
    first = make_projector(spec, PLANS).project(grads, checkpoint=1)
    torch.manual_seed(456)
    second = make_projector(spec, PLANS).project(grads, checkpoint=1)
    assert torch.equal(first, second)
    other_checkpoint = make_projector(spec, PLANS).project(grads, checkpoint=2)
    other_seed = make_projector(ProjectionSpec(kind=kind, dim=64, seed=8), PLANS).project(grads, checkpoint=1)
    assert not torch.allclose(first, other_checkpoint)
    assert not torch.allclose(first, other_seed)


@pytest.mark.parametrize("projector_type", [DenseProjector, SJLTProjector])
def test_blockwise_generation_equals_one_block(projector_type):
    """Dense matrices are generated block by block; the block size must not change the result... within a block plan.

    The block plan is part of the projection, so two projectors agree iff they use the same block rows:
    we check that tiny blocks (many generator calls) and a cache that holds nothing give the same answer
    as the cached path, and that the result is linear in the gradients.
    """
    spec = ProjectionSpec(kind="rademacher" if projector_type is DenseProjector else "sjlt", dim=32, seed=1)
    grads = _grads()
    cached = projector_type(spec, PLANS)
    uncached = projector_type(spec, PLANS, cache_bytes=0)
    torch.testing.assert_close(cached.project(grads, 0), uncached.project(grads, 0))
    torch.testing.assert_close(cached.project(grads, 0), cached.project(grads, 0))
    twice = cached.project(2 * grads[:2] + grads[2:4], 0)
    torch.testing.assert_close(
        twice, 2 * cached.project(grads[:2], 0) + cached.project(grads[2:4], 0), rtol=1e-4, atol=1e-4
    )


def test_dense_projection_matches_explicit_matrix():
    """Assemble the p×k matrix from the unit vectors and compare with a plain matmul."""
    spec = ProjectionSpec(kind="gaussian", dim=16, seed=2)
    projector = DenseProjector(spec, PLANS, block_bytes=4 * 16 * 7)  # 7 rows per block: many blocks
    matrix = projector.project(torch.eye(P), 0)  # [p, k]
    grads = _grads()
    torch.testing.assert_close(projector.project(grads, 0), grads @ matrix, rtol=1e-4, atol=1e-5)
    # entries are N(0, 1/k)
    assert abs(float(matrix.std()) - 1 / np.sqrt(16)) < 0.02


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sjlt"])
def test_inner_products_preserved_in_expectation(kind):
    grads = _grads(batch=40, seed=5)
    exact = grads @ grads.T
    projected = make_projector(ProjectionSpec(kind=kind, dim=2048, seed=0), PLANS).project(grads, 0)
    approx = projected @ projected.T
    relative = (approx.diagonal() / exact.diagonal() - 1).abs()
    assert float(relative.mean()) < 0.06


def test_identity_is_exact():
    grads = _grads()
    projector = make_projector(ProjectionSpec(kind="none"), PLANS)
    assert projector.out_dim == P
    assert torch.equal(projector.project(grads, 0), grads)


def test_wrong_gradient_width_is_an_error():
    projector = make_projector(ProjectionSpec(kind="rademacher", dim=8), PLANS)
    with pytest.raises(ValueError, match=rf"shape \[B, {P}\]"):
        projector.project(torch.zeros(2, P + 1), 0)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"kind": "fourier"}, "kind must be one of kron, none"),
        ({"dim": 0}, "dim must be a positive integer, got 0"),
        ({"seed": -1}, "seed must be a non-negative integer, got -1"),
    ],
)
def test_spec_validation(options, message):
    with pytest.raises(ValueError, match=message):
        ProjectionSpec(**options)
