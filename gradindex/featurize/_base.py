"""The featurizer interface: a batch of samples -> one vector φ per sample, ⟨φ(q), φ(z)⟩ ≈ influence of z on q;
and what every featurizer starts from: the device, the task's checkpoints loaded, the model's fingerprint."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradindex.checkpoints import CheckpointSpec, checkpoint_sha256, load_into
from gradindex.errors import ArgumentError
from gradindex.task import Task

__all__ = ["Featurizer", "LoadedCheckpoint", "load_checkpoints", "model_fingerprint", "resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; an unavailable CUDA request is a clear error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ArgumentError(
            "device", f"device={device} asked for, but torch sees no CUDA device; use device=cpu or auto"
        )
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise ArgumentError("device", f"device must be auto, cpu or cuda[:N], got {device!r}") from error


@dataclass(frozen=True)
class LoadedCheckpoint:
    spec: CheckpointSpec
    sha256: str
    state: dict[str, Tensor]  # the LossModule's state: "model.<name>" keys


def load_checkpoints(task: Task, specs: Sequence[CheckpointSpec], device: torch.device) -> list[LoadedCheckpoint]:
    """Load every checkpoint into the task's model (validating it fits) and keep its tensors on ``device``."""
    loaded = []
    for spec in specs:
        model = load_into(task.model(), spec.path)
        state = {f"model.{key}": value.detach().to(device) for key, value in model.state_dict(keep_vars=False).items()}
        # state_dict omits non-persistent buffers; functional_call keeps the module's own for those
        loaded.append(LoadedCheckpoint(spec=spec, sha256=checkpoint_sha256(spec.path), state=state))
    return loaded


def model_fingerprint(model: nn.Module) -> dict:
    """Class and parameter names/shapes: what must match between build and query."""
    cls = type(model)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "parameters": [[name, list(param.shape)] for name, param in model.named_parameters()],
    }


class Featurizer(ABC):
    """A batch -> ``[B, dim]`` float32 vectors. Built identically at build and at query time."""

    dim: int

    @abstractmethod
    def featurize(self, batch: Any) -> Tensor:
        """collated batch of B samples -> [B, dim]."""

    @abstractmethod
    def fingerprint(self) -> dict:
        """Method, projection and parameters that fix what the vectors mean (recorded in the manifest)."""

    def attach(self, store: Any) -> None:
        """Load (or compute and write) what the featurizer keeps in the store's ``transforms/``; called by every
        build worker before its first shard and by every query before its first batch. Nothing, unless overridden."""
        return None
