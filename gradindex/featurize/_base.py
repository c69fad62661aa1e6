"""The featurizer interface: a batch of samples -> one vector φ per sample, ⟨φ(q), φ(z)⟩ ≈ influence of z on q;
and what every featurizer starts from: the device, the task's checkpoints loaded, the model's fingerprint."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradindex.checkpoints import CheckpointSpec, checkpoint_sha256, load_into, tied_aliases
from gradindex.errors import ArgumentError
from gradindex.task import Task, model_class_name

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
    """Load every checkpoint into the task's model (validating it fits) and keep its tensors on ``device``.

    Each tensor is kept once, under its first name: a tied parameter (GPT-2's ``lm_head.weight`` is
    ``transformer.wte.weight``) or a module used in two places is passed to ``functional_call`` under that name only,
    which ties the other names to it, so its gradient is the sum over every use. Non-persistent buffers are not in a
    state dict; ``functional_call`` keeps the module's own for those.

    Args:
        task: the task whose model the checkpoints are loaded into.
        specs: the checkpoints (files or folders, see ``gradindex.checkpoints``).
        device: where the tensors are kept.

    Returns:
        One ``LoadedCheckpoint`` per spec, its state under ``model.<name>`` keys.

    Raises:
        CheckpointError: a checkpoint that cannot be read or does not fit the model.
    """
    loaded = []
    for spec in specs:
        model = load_into(task.model(), spec.path)
        aliases = tied_aliases(model)
        state = {
            f"model.{key}": value.detach().to(device)
            for key, value in model.state_dict(keep_vars=False).items()
            if key not in aliases
        }
        loaded.append(LoadedCheckpoint(spec=spec, sha256=checkpoint_sha256(spec.path), state=state))
    return loaded


def model_fingerprint(model: nn.Module) -> dict:
    """Class and parameter names/shapes: what must match between build and query."""
    cls = type(model)
    return {
        "class": model_class_name(cls),  # a task file's class: <file name>:<qualname>
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
