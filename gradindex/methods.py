"""Which featurizer a method name means. New methods register here.

``tracin`` is the featurizer of ``gradindex.featurize``; ``gex``, ``if``, ``arnoldi`` and ``trak`` live in
``gradindex.influence`` (their options: ``gradindex.influence.METHOD_OPTIONS``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from gradindex.featurize import Featurizer, LoadedCheckpoint, TracInFeaturizer
from gradindex.influence import make_method_featurizer, resolve_options
from gradindex.project import ProjectionSpec
from gradindex.task import Task

__all__ = ["METHODS", "make_featurizer"]

METHODS = ("tracin", "gex", "if", "arnoldi", "trak")


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
    runtime: dict[str, Any] | None = None,
) -> Featurizer:
    """The featurizer for ``method``; the same call at build and at query time gives the same vectors.

    ``runtime`` says how, not what (not fingerprinted): ``chunk_bytes``, ``compile``, ``autocast`` for tracin.
    """
    if method == "tracin":
        if options:
            resolve_options("tracin", options)  # says which method the options belong to
        return TracInFeaturizer(task, checkpoints, projection=projection, layers=layers, normalize=normalize, device=device, **(runtime or {}))
    if method in METHODS:
        return make_method_featurizer(
            method, task, checkpoints, projection=projection, layers=layers, normalize=normalize, device=device, options=options
        )
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
