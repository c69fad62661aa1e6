"""Checkpoints: ``PATH[:WEIGHT]`` specs, content hashes and state-dict loading."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gradindex.errors import CheckpointError
from gradindex.utils import sha256_file

__all__ = ["CheckpointSpec", "checkpoint_sha256", "load_into", "load_state_dict", "parse_checkpoints"]


@dataclass(frozen=True, kw_only=True)
class CheckpointSpec:
    """A checkpoint file and its TracIn weight (the learning rate in effect before it)."""

    path: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight) or self.weight <= 0:
            raise CheckpointError(f"checkpoint weight must be a positive number, got {self.weight} for {self.path}")

    @staticmethod
    def parse(text: str) -> CheckpointSpec:
        """``ckpt.pt`` or ``ckpt.pt:0.1``; a colon whose suffix is not a number must be part of the path only if the
        file exists."""
        if not text:
            raise CheckpointError("an empty checkpoint; give PATH or PATH:WEIGHT, e.g. runs/ckpt-010.pt:0.1")
        path, sep, weight_text = text.rpartition(":")
        if not sep or Path(text).exists():
            return CheckpointSpec(path=text)
        try:
            weight = float(weight_text)
        except ValueError:
            raise CheckpointError(
                f"bad checkpoint {text!r}: the weight after ':' must be a number, e.g. {path or 'ckpt.pt'}:0.1"
            ) from None
        if not path:
            raise CheckpointError(f"bad checkpoint {text!r}: give PATH or PATH:WEIGHT, e.g. runs/ckpt-010.pt:0.1")
        return CheckpointSpec(path=path, weight=weight)

    def to_dict(self) -> dict:
        return {"path": self.path, "weight": self.weight}


def parse_checkpoints(items: Sequence[str | CheckpointSpec | tuple]) -> list[CheckpointSpec]:
    """Checkpoint specs from strings, (path, weight) pairs or specs."""
    specs = []
    for item in items:
        if isinstance(item, CheckpointSpec):
            specs.append(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            specs.append(CheckpointSpec(path=str(item[0]), weight=float(item[1])))
        elif isinstance(item, (str, Path)):
            specs.append(CheckpointSpec.parse(str(item)))
        else:
            raise CheckpointError(f"cannot read a checkpoint from {item!r}; give 'PATH' or 'PATH:WEIGHT'")
    if not specs:
        raise CheckpointError("at least one checkpoint is needed: PATH or PATH:WEIGHT, e.g. runs/ckpt-010.pt:0.1")
    return specs


def checkpoint_sha256(path: str | Path) -> str:
    """The sha256 of a checkpoint file (what a store records of it), or a CheckpointError when it is not one."""
    _require_file(Path(path))
    try:
        return sha256_file(path)
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read ({error.strerror or error}); check its path") from None


def _require_file(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a folder; give the checkpoint file in it (a torch.save state dict, .pt or .bin, "
            "or a .safetensors file)"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check its path")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``torch.save`` file (a bare state dict, or one under 'state_dict'/'model') or a safetensors
    file."""
    path = Path(path)
    _require_file(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(
                f"{path} is a safetensors file; install safetensors (pip install safetensors)"
            ) from None
        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError on a damaged or foreign file
            raise CheckpointError(
                f"checkpoint {path} is not a readable safetensors file ({type(error).__name__}: {error}); "
                "check the file, or save it again with safetensors.torch.save_file"
            ) from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot load checkpoint {path} with torch.load ({type(error).__name__}: {error})"
        ) from error
    if isinstance(state, dict) and not all(isinstance(value, torch.Tensor) for value in state.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(
            f"checkpoint {path} holds no state dict of tensors; save it with torch.save(model.state_dict(), path)"
        )
    return state


def load_into(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint into a model, with a clear error naming missing/unexpected keys or shape mismatches."""
    state = load_state_dict(path)
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
        for key in own
        if key in state and state[key].shape != own[key].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}")
        if mismatched:
            parts.append(f"shape mismatch {', '.join(mismatched[:5])}")
        raise CheckpointError(
            f"checkpoint {path} does not fit the task's model ({'; '.join(parts)}); check the task and the checkpoint"
        )
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            count = int((~torch.isfinite(value)).sum())
            raise CheckpointError(
                f"checkpoint {path} holds NaN or infinite values in {key} ({count} of {value.numel()}): the training "
                "run had diverged when it was saved; use an earlier checkpoint"
            )
    model.load_state_dict(state)
    return model
