"""The pca kron plan from calibration spectra: k goes where it keeps the most gradient energy; small layers and the
unfactored parameters are projected flat on their top directions; what a plan records comes back the same."""

from __future__ import annotations

import pytest
import torch

from gradindex.projection import (
    KronLayer,
    KronPlan,
    flat_spectrum,
    mix_spectra,
    pca_flat_matrix,
    pca_side_matrix,
    plan_kron,
)

WIDE = KronLayer("wide", "linear", ("wide.weight",), 100, 60)
TIED = KronLayer("embed", "tied", ("embed.weight",), 50, 8, (("embed", "embedding"), ("head", "linear")))


def _decaying(width: int, rate: float) -> list[float]:
    return [rate**index for index in range(width)]


def test_k_goes_to_the_side_whose_energy_is_spread():
    """A side whose energy sits in 2 directions keeps 2; the other side takes the rest of the budget."""
    spectra = [{"in": [1.0, 1.0] + [0.0] * 98, "out": [1.0] * 60}]
    plan = plan_kron(150, [WIDE], energies=[1.0], sides="pca", spectra=spectra)
    assert (plan.layers[0].k_in, plan.layers[0].k_out) == (2, 60) and plan.dim <= 150
    assert plan == plan_kron(150, [WIDE], energies=[1.0], sides="pca", spectra=spectra)  # deterministic
    # more energy in a group draws more of the budget to it
    layers = [WIDE, KronLayer("other", "linear", ("other.weight",), 100, 60)]
    spectra = [{"in": _decaying(100, 0.9), "out": _decaying(60, 0.9)}] * 2
    skewed = plan_kron(400, layers, energies=[10.0, 1.0], sides="pca", spectra=spectra)
    assert skewed.layers[0].dim > 2 * skewed.layers[1].dim and skewed.dim <= 400


def test_small_layers_and_the_rest_are_projected_flat():
    spectra = [{"in": _decaying(100, 0.95), "out": _decaying(60, 0.95)}, {"flat": _decaying(400, 0.9)}]
    spectra.append({"flat": _decaying(30, 0.5)})
    plan = plan_kron(300, [WIDE, TIED], ("norm.weight",), 30, energies=[1.0, 1.0, 0.1], sides="pca", spectra=spectra)
    flat = plan.layers[1]
    assert flat.flat and (flat.k_in, flat.k_out) == (50, 8) and flat.dim == flat.flat and not flat.narrow_sides()
    assert plan.rest_kind == "pca" and 1 <= plan.rest_dim < 30
    entries = plan.to_dict()
    assert entries[1]["flat"] == flat.flat and entries[1]["uses"] == [["embed", "embedding"], ["head", "linear"]]
    assert entries[-1]["type"] == "pca"
    assert KronPlan.from_dict(entries, [WIDE, TIED], ("norm.weight",), 30) == plan
    # a budget that covers a flat group keeps it whole: exact
    whole = plan_kron(10**5, [WIDE, TIED], ("norm.weight",), 30, energies=[1.0, 1.0, 0.1], sides="pca", spectra=spectra)
    assert not whole.layers[1].flat and whole.rest_kind == "identity"
    with pytest.raises(ValueError, match="recorded kron plan of embed is invalid"):
        KronPlan.from_dict([entries[0], dict(entries[1], flat=400), entries[2]], [WIDE, TIED], ("norm.weight",), 30)
    with pytest.raises(ValueError, match="unfactored parameters is invalid"):
        KronPlan.from_dict([*entries[:2], dict(entries[2], type="pca", dim=30)], [WIDE, TIED], ("norm.weight",), 30)
    with pytest.raises(ValueError, match="does not fit this model"):  # another tied layout is another model
        other = KronLayer("embed", "tied", ("embed.weight",), 50, 8, (("embed", "embedding"),))
        KronPlan.from_dict(entries, [WIDE, other], ("norm.weight",), 30)
    with pytest.raises(ValueError, match="2 spectra for 3 parameter groups"):
        plan_kron(300, [WIDE, TIED], ("norm.weight",), 30, energies=[1.0, 1.0, 0.1], sides="pca", spectra=spectra[:2])


def test_the_budget_is_spent_past_the_calibration_rank():
    """Spectra that end (a rank-deficient calibration) still get the budget: the directions it did not see."""
    plan = plan_kron(64, [], ("a", "b"), 500, energies=[1.0], sides="pca", spectra=[{"flat": [3.0, 2.0, 1.0]}])
    assert plan.rest_dim == 64 and plan.rest_kind == "pca"


def test_flat_pca_is_the_top_eigenvectors_of_the_moment_and_completes_past_its_rank():
    generator = torch.Generator().manual_seed(0)
    scales = torch.linspace(3, 0.1, 50, dtype=torch.float64)
    for samples in (20, 80):  # through the [n, n] Gram matrix, and through the moment itself
        rows = torch.randn(samples, 50, generator=generator, dtype=torch.float64) * scales
        moment = rows.T @ rows
        torch.testing.assert_close(pca_flat_matrix(rows, 10), pca_side_matrix(moment, 10), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            flat_spectrum(rows)[:10], torch.linalg.eigvalsh(moment).flip(0)[:10], rtol=1e-9, atol=1e-9
        )
    rows = torch.randn(20, 50, generator=generator, dtype=torch.float64)
    completed = pca_flat_matrix(rows, 30)  # 20 directions seen, 10 more the calibration did not see
    torch.testing.assert_close(completed.T @ completed, torch.eye(30), atol=1e-5, rtol=0)
    torch.testing.assert_close(completed[:, :20], pca_flat_matrix(rows, 20))
    assert torch.equal(completed, pca_flat_matrix(rows.clone(), 30))


def _completed_one_by_one(basis: torch.Tensor, k: int) -> torch.Tensor:
    """The trusted slow completion: unit vectors farthest from the span first (ties by index), each made orthogonal to
    every column so far by modified Gram-Schmidt, kept when over half of it is left (then, for what is still missing,
    over 1e-6)."""
    outside = 1.0 - basis.square().sum(1)
    columns = [basis[:, j] for j in range(basis.shape[1])]
    for least in (0.5, 1e-6):
        for index in torch.argsort(-outside, stable=True).tolist():
            if len(columns) == k:
                break
            vector = torch.zeros(basis.shape[0], dtype=torch.float64)
            vector[index] = 1.0
            for _ in range(2):
                for column in columns:
                    vector -= column * (column @ vector)
            if float(vector.norm()) > least:
                columns.append(vector / vector.norm())
    return torch.stack(columns, dim=1)


def test_flat_pca_completion_equals_gram_schmidt_one_vector_at_a_time():
    """A flat group's pca matrix past its calibration vectors' rank is completed a block of unit vectors at a time
    (QR): the same columns as orthogonalising them one by one, also when some lie in the span (left out)."""
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(40, 300, generator=generator, dtype=torch.float64)
    rows[:, :5] = 0.0
    rows[:5, :5] = torch.eye(5, dtype=torch.float64)  # e_0..e_4 in the span: never added again
    for k in (41, 150, 250, 299):
        fast = pca_flat_matrix(rows, k)
        seen = pca_flat_matrix(rows, 40).double()
        torch.testing.assert_close(fast.double(), _completed_one_by_one(seen, k).float().double(), atol=2e-6, rtol=0)
        torch.testing.assert_close(fast.T @ fast, torch.eye(k), atol=2e-5, rtol=0)


def test_spectra_of_several_checkpoints_mix_by_their_weights():
    concentrated, spread = [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]
    assert mix_spectra([concentrated, spread], [1.0, 0.0]) == pytest.approx(concentrated, abs=1e-6)
    mixed = mix_spectra([concentrated, spread], [1.0, 1.0])
    assert mixed == pytest.approx([0.625, 0.125, 0.125, 0.125], abs=1e-6)
    assert mix_spectra([None, None], [1.0, 1.0]) is None
