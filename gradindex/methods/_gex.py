"""GEX (Kim et al., NeurIPS 2023): influence from a geometric ensemble's loss deviations, no gradients.

With θ* the trained model and θ_1..θ_M the members of a geometric ensemble around it
(``gradindex ensemble``), every sample gets M losses from M forward passes:

    φ(z) = (1/√M) · [ℓ(z; θ_m) − max(ℓ(z; θ*), τ)]_{m=1..M}

so ⟨φ(q), φ(z)⟩ is the ensemble's mean product of loss deviations (≈ ∇ℓ(q)ᵀ Σ ∇ℓ(z) with Σ the
members' spread, positive = proponent) and the self-influence ⟨φ(z), φ(z)⟩ is the mean squared
deviation. The checkpoints are given in that order: θ* first, then the members.

τ floors the reference loss of samples the trained model already fits. The paper uses 0.05; the default
here is 0, because the floor is an absolute loss while a model that fits its labels has losses of 1e-3
and below: when the floor lies above both ℓ(θ*) and the members' change, every deviation is ≈ −τ and the
samples whose members' losses rose most get the *smallest* squares — the ranking turns upside down
(measured: flipped-label AUC 0.12 with τ = 0.05, 0.88 with τ = 0, members that barely moved). A build
whose deviations are dominated by τ for most training samples ends with a ``GradIndexWarning`` naming
the fix. What makes GEX work is members that leave θ*'s basin (``gradindex ensemble``'s default weight
decay): then memorised labels are forgotten by the members, their losses rise far above any floor.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from gradindex.errors import ArgumentError, GradIndexWarning
from gradindex.featurize import LoadedCheckpoint, LossModule
from gradindex.methods._base import _BuiltinMethod, check_projection, row_dots
from gradindex.methods._options import recorded_options
from gradindex.projection import ProjectionSpec
from gradindex.task import Task, to_device

__all__ = ["TAU_DOMINATED", "GexFeaturizer"]

# a build warns when τ dominates the deviations (floor shift > the members' loss change) of more than this share
TAU_DOMINATED = 0.5


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
        self.n_seen = 0  # training samples featurized by this process, and how many of them τ dominated
        self.n_dominated = 0

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
        return self._deviations(*self.losses(batch))

    def _deviations(self, base: Tensor, members: Tensor) -> Tensor:
        reference = torch.clamp(base, min=self.options["tau"])
        return (members - reference[:, None]) / math.sqrt(self.n_members)

    def featurize_train(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Stored vectors ``[B, M]`` and self-influence ``[B]``; counts the samples whose deviations τ dominates: the
        floor's shift max(τ − ℓ(θ*), 0) exceeds the members' loss change (root mean square of ℓ(θ_m) − ℓ(θ*))."""
        base, members = self.losses(batch)
        vectors = self._deviations(base, members)
        shift = torch.clamp(self.options["tau"] - base, min=0)
        change = (members - base[:, None]).pow(2).mean(dim=1).sqrt()
        self.n_seen += int(base.numel())
        self.n_dominated += int((shift > change).sum())
        return vectors, row_dots(vectors, vectors)

    def finish(self, store: Any) -> None:
        """Warn when τ dominated the deviations of most training samples this process featurized."""
        if self.n_seen and self.n_dominated > TAU_DOMINATED * self.n_seen:
            tau = self.options["tau"]
            warnings.warn(
                f"GEX's loss deviations are dominated by tau={tau:g} for {self.n_dominated / self.n_seen:.0%} of the "
                f"training samples (the floor lies farther above their loss at θ* than the ensemble members' losses "
                f"move), which ranks them upside down: rebuild with tau=0 (--tau 0, the default) or with members that "
                f"leave θ*'s basin (`gradindex ensemble` with its default --weight-decay)",
                GradIndexWarning,
                stacklevel=2,
            )
