"""The user's side of gradindex: a Task names the model, the data and the loss.

A task file is any Python file or module with a factory returning a ``Task``::

    def task() -> gradindex.Task:
        return gradindex.Task(model=make_mlp, train=train_ds, test=test_ds)

and the command line names it as ``path/to/file.py:task``, ``package.module:task`` or a
built-in name such as ``digits``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradindex.errors import GradIndexError, TaskSpecError

__all__ = ["BUILTIN_TASKS", "Task", "cross_entropy_loss", "default_margin", "load_task"]

# The built-in tasks by name: each is a ``module:factory`` spec like any other, so ``--task digits`` loads exactly as
# ``--task gradindex.tasks:digits`` would (the registry names them; nothing here imports them).
BUILTIN_TASKS: dict[str, str] = {
    "digits": "gradindex.tasks:digits",
    "digits-cnn": "gradindex.tasks:digits_cnn",
    "breast-cancer": "gradindex.tasks:breast_cancer",
    "mnist1d": "gradindex.tasks:mnist1d",
    "mnist1d-cnn": "gradindex.tasks:mnist1d_cnn",
}


def cross_entropy_loss(model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
    """Per-sample cross-entropy: ``[B]``. The default loss of a Task."""
    inputs, targets = batch[0], batch[1]
    return nn.functional.cross_entropy(model(inputs), targets, reduction="none")


def default_margin(model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
    """TRAK's output function for classification: logit of the true class minus logsumexp of the others. ``[B]``.

    Written without in-place indexing (a mask instead of ``scatter_``) so that ``vmap`` runs it batched.
    """
    inputs, targets = batch[0], batch[1]
    logits = model(inputs)
    mask = targets.long().unsqueeze(-1) == torch.arange(logits.shape[-1], device=logits.device)
    correct = logits.masked_fill(~mask, 0.0).sum(dim=-1)
    return correct - torch.logsumexp(logits.masked_fill(mask, float("-inf")), dim=-1)


@dataclass(frozen=True, kw_only=True)
class Task:
    """What gradindex needs to know about a model and its data: a task file's factory returns one.

    Args:
        model: a zero-argument callable building the architecture (a class, a lambda); the weights come from
            the checkpoints.
        train: the map-style training set; ``train[i]`` is ``(input, target, ...)`` and becomes row i of the store.
        test: the default query split (optional); more splits go in ``queries``.
        queries: further named query splits, e.g. ``{"val": val_ds}``.
        loss: ``loss(model, batch) -> Tensor[B]``, the per-sample loss of a collated batch; default: per-sample
            cross-entropy of ``model(batch[0])`` against ``batch[1]``.
        margin: ``margin(model, batch) -> Tensor[B]``, the output function TRAK uses; default: the classification
            margin (logit of the true class minus logsumexp of the others).
        sample_ids: one id per training sample (str or int); default: the row number.
        train_step: ``train_step(model, batch, optimizer) -> loss``, used by ``make_ensemble`` (default: SGD on
            ``loss``).
        regularization: ``regularization(model) -> scalar`` added to the training objective (influence functions'
            curvature).
        collate: the collate function of batches; default: torch's ``default_collate``.
        name: a display name recorded in the manifest.
    """

    model: Callable[[], nn.Module]
    train: Any
    test: Any | None = None
    queries: Mapping[str, Any] = field(default_factory=dict)
    loss: Callable[[nn.Module, Sequence[Tensor]], Tensor] = cross_entropy_loss
    margin: Callable[[nn.Module, Sequence[Tensor]], Tensor] = default_margin
    sample_ids: Sequence[Any] | None = None
    train_step: Callable[..., Any] | None = None
    regularization: Callable[[nn.Module], Tensor] | None = None
    collate: Callable[[list], Any] | None = None
    name: str = "task"

    def __post_init__(self) -> None:
        if not callable(self.model):
            raise TaskSpecError(
                "Task.model must be a zero-argument callable that builds the model "
                f"(e.g. a class or a lambda), got {type(self.model).__name__}"
            )
        for split_name, dataset in (
            ("train", self.train),
            *((("test", self.test),) if self.test is not None else ()),
            *self.queries.items(),
        ):
            if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
                raise TaskSpecError(
                    f"Task.{split_name} must be a map-style dataset (with __len__ and __getitem__), "
                    f"got {type(dataset).__name__}"
                )
        if self.sample_ids is not None and len(self.sample_ids) != len(self.train):
            raise TaskSpecError(
                f"Task.sample_ids has {len(self.sample_ids)} ids for {len(self.train)} training samples; give one id "
                "per sample"
            )

    def split(self, name: str) -> Any:
        """The dataset of a query split by name: ``train``, ``test`` or a key of ``queries``."""
        if name == "train":
            return self.train
        if name == "test" and self.test is not None:
            return self.test
        if name in self.queries:
            return self.queries[name]
        known = ["train"] + (["test"] if self.test is not None else []) + list(self.queries)
        raise TaskSpecError(f"task {self.name!r} has no split {name!r}; choose one of {', '.join(known)}")

    def train_sample_ids(self) -> list:
        """One id per training row (the row number when the task gives none)."""
        if self.sample_ids is None:
            return list(range(len(self.train)))
        return list(self.sample_ids)


def _load_factory(spec: str) -> Callable[[], Any]:
    if ":" not in spec:
        if spec in BUILTIN_TASKS:
            return _load_factory(BUILTIN_TASKS[spec])
        raise TaskSpecError(
            f"unknown task {spec!r}; give path/to/file.py:factory, package.module:factory, "
            f"or a built-in name ({', '.join(sorted(BUILTIN_TASKS))})"
        )
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise TaskSpecError(f"task spec {spec!r} must look like path/to/file.py:factory or package.module:factory")
    if target.endswith(".py") or "/" in target or Path(target).is_file():
        path = Path(target)
        if not path.is_file():
            raise TaskSpecError(f"task file {target} does not exist; check the path in --task {spec}")
        module_name = f"_gradindex_task_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise TaskSpecError(f"cannot import {target} as a Python file; give a .py file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:  # the user's code failed: say where, keep the cause
            sys.modules.pop(module_name, None)
            raise TaskSpecError(f"importing task file {target} failed: {type(error).__name__}: {error}") from error
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise TaskSpecError(f"cannot import module {target!r} for --task {spec}: {error}") from error
    factory = getattr(module, attr, None)
    if factory is None:
        raise TaskSpecError(f"{target} has no attribute {attr!r}; name the function that returns the gradindex.Task")
    if not callable(factory):
        raise TaskSpecError(f"{target}:{attr} is not callable; name a function that returns a gradindex.Task")
    return factory


def load_task(spec: str | Task, **options: Any) -> Task:
    """A Task from a spec string, or the Task itself.

    Args:
        spec: ``path/to/file.py:factory``, ``package.module:factory``, a built-in name (``BUILTIN_TASKS``), or a
            ``Task``.
        **options: keyword arguments for the factory (``flip_fraction=0.1`` for ``digits``).

    Raises:
        TaskSpecError: the spec cannot be loaded, its factory fails, or it returns something else than a Task.
    """
    if isinstance(spec, Task):
        return spec
    if not isinstance(spec, str) or not spec:
        raise TaskSpecError(f"a task spec must be a non-empty string, got {spec!r}")
    factory = _load_factory(spec)
    try:
        task = factory(**options)
    except GradIndexError:
        raise
    except Exception as error:
        raise TaskSpecError(f"task factory {spec} raised {type(error).__name__}: {error}") from error
    if not isinstance(task, Task):
        raise TaskSpecError(f"task factory {spec} returned {type(task).__name__}, not a gradindex.Task")
    return task
