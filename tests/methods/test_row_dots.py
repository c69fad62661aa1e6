"""Row-wise inner products (self-influence and its cross terms) against float64."""

from __future__ import annotations

import torch

from gradindex.methods import row_dots


def test_row_dots_are_float64_inner_products_to_float32_precision():
    """Self-influence is a row's squared norm (one fused float32 reduction); other products accumulate in float64:
    both must equal the float64 answer to float32 precision, with no cancellation."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(64, 3000, generator=generator) * torch.logspace(-3, 3, 64).unsqueeze(1)
    right = left + 1e-3 * torch.randn(64, 3000, generator=generator)
    for a, b in ((left, left), (left, right)):
        exact = (a.double() * b.double()).sum(dim=1)
        got = row_dots(a, b)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exact, rtol=2e-6, atol=0)
