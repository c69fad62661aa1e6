"""GEX (Kim et al., NeurIPS 2023): influence from a geometric ensemble's loss deviations, no gradients.

With θ* the trained model and θ_1..θ_M the members of a geometric ensemble around it
(``gradindex ensemble``), every sample gets M losses from M forward passes:

    φ(z) = (1/√M) · [ℓ(z; θ_m) − max(ℓ(z; θ*), τ)]_{m=1..M}

so ⟨φ(q), φ(z)⟩ is the ensemble's mean product of loss deviations (≈ ∇ℓ(q)ᵀ Σ ∇ℓ(z) with Σ the
members' spread, positive = proponent) and the self-influence ⟨φ(z), φ(z)⟩ is the mean squared
deviation. τ (default 0.05, as in the paper) floors the reference loss of samples the trained model
already fits. The checkpoints are given in that order: θ* first, then the members.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from gradindex.errors import ArgumentError
from gradindex.featurize import LoadedCheckpoint, LossModule
from gradindex.methods._base import _BuiltinMethod, check_projection
from gradindex.methods._options import recorded_options
from gradindex.projection import ProjectionSpec
from gradindex.task import Task, to_device

__all__ = ["GexFeaturizer"]


class GexFeaturizer(_BuiltinMethod):
    """``gex``: φ(z) = (1/√M)[ℓ(z; θ_m) − max(ℓ(z; θ*), τ)]_m; checkpoints are θ*, θ_1, …, θ_M."""

    method = "gex"
    symmetric = True

    def __init__(
        self,
        task: Task,
        checkpoints: Sequence[LoadedCheckpoint],
        *,
        projection: ProjectionSpec,
        layers: Sequence[str] | None = None,
        normalize: bool = False,
        device: torch.device = torch.device("cpu"),
        options: Mapping[str, Any] | None = None,
    ):
        check_projection("gex", projection)
        if normalize:
            raise ArgumentError(
                "normalize",
                "normalize=True does not apply to method=gex: its vectors are loss deviations, not gradients; "
                "leave it out",
                also=["method"],
            )
        if layers:
            raise ArgumentError(
                "layers",
                "layers do not apply to method=gex: its vectors are losses of whole models; leave them out",
                also=["method"],
            )
        if len(checkpoints) < 2:
            raise ValueError(
                "--method gex needs the trained checkpoint θ* first and then the ensemble members (from `gradindex "
                "ensemble`); "
                f"got {len(checkpoints)} checkpoint(s)"
            )
        model = self._setup("gex", task, layers=None, normalize=False, device=device, options=options)
        self.seed = projection.seed
        self._loss = LossModule(model, task.loss).eval()
        self._base = checkpoints[0].state
        self._members = [ckpt.state for ckpt in checkpoints[1:]]
        self.n_members = len(self._members)
        self.dim = self.n_members

    def fingerprint(self) -> dict:
        return {
            "method": {"name": "gex", "normalize": False, **recorded_options("gex", self.options)},
            "projection": ProjectionSpec(kind="none", dim=self.dim, seed=self.seed).to_dict(),
            "layers": None,
            "params": [list(item) for item in self.model_fingerprint["parameters"]],
            "block_dim": self.dim,
        }

    def losses(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(ℓ(z; θ*) [B], ℓ(z; θ_m) [B, M])`` from forward passes only."""
        batch = to_device(batch, self.device)
        with torch.no_grad():
            base = functional_call(self._loss, self._base, (batch,)).float()
            members = torch.stack(
                [functional_call(self._loss, state, (batch,)).float() for state in self._members], dim=1
            )
        return base, members

    def featurize(self, batch: Any) -> Tensor:
        """collated batch of B samples -> [B, M]."""
        base, members = self.losses(batch)
        reference = torch.clamp(base, min=self.options["tau"])
        return (members - reference[:, None]) / math.sqrt(self.n_members)
