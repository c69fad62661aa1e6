"""Which featurizer a method name means. New methods register here."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from gradindex.featurize import Featurizer, LoadedCheckpoint, TracInFeaturizer
from gradindex.project import ProjectionSpec
from gradindex.task import Task

__all__ = ["METHODS", "make_featurizer"]

METHODS = ("tracin",)


def make_featurizer(
    method: str,
    task: Task,
    checkpoints: Sequence[LoadedCheckpoint],
    *,
    projection: ProjectionSpec,
    layers: Sequence[str] | None,
    normalize: bool,
    device: torch.device,
    options: dict[str, Any] | None = None,
) -> Featurizer:
    """The featurizer for ``method``; the same call at build and at query time gives the same vectors."""
    if method == "tracin":
        return TracInFeaturizer(task, checkpoints, projection=projection, layers=layers, normalize=normalize, device=device)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
