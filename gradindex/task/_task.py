"""The user's side of gradindex: a Task names the model, the data and the loss.

A task file is any Python file or module with a factory returning a ``Task``::

    def task() -> gradindex.Task:
        return gradindex.Task(model=make_mlp, train=train_ds, test=test_ds)

and the command line names it as ``path/to/file.py:task``, ``package.module:task`` or a
built-in name such as ``digits``.

A task file is loaded under one module name in every process, derived from the sha256 of its resolved path
(``_gradindex_taskfile_<stem>_<digest>``), with its folder first on ``sys.path`` while it runs (so it can import its
sibling modules) and last afterwards (for imports its functions make later, without shadowing installed packages).
A class it defines is recorded in a store as ``<file name>:<qualname>`` (``model_class_name``), so the store can be
queried by any later process, and after the task file moved to another folder.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from gradindex.errors import GradIndexError, TaskSpecError
from gradindex.task._batches import labels_of
from gradindex.task._collate import LABEL_KEYS, collate_samples
from gradindex.task._conventions import (
    causal_lm_loss,
    causal_lm_margin,
    cross_entropy_loss,
    default_loss,
    default_margin,
    logits_of,
)
from gradindex.task._hf import HFArchitecture, hf_config, prepare_model
from gradindex.task._tables import TableDataset, is_table

__all__ = ["BUILTIN_TASKS", "TASK_FILE_PREFIX", "Task", "load_task", "model_class_name"]

TASK_FILE_PREFIX = "_gradindex_taskfile_"

# The built-in tasks by name: each is a ``module:factory`` spec like any other, so ``--task digits`` loads exactly as
# ``--task gradindex.tasks:digits`` would (the registry names them; nothing here imports them).
BUILTIN_TASKS: dict[str, str] = {
    "digits": "gradindex.tasks:digits",
    "digits-cnn": "gradindex.tasks:digits_cnn",
    "breast-cancer": "gradindex.tasks:breast_cancer",
    "mnist1d": "gradindex.tasks:mnist1d",
    "mnist1d-cnn": "gradindex.tasks:mnist1d_cnn",
    "hf-causal-lm": "gradindex.tasks:hf_causal_lm",
    "hf-classifier": "gradindex.tasks:hf_classifier",
}

# the built-in losses and margins, which take the label's name from the Task (``Task(label=...)``)
_CONVENTIONAL = (default_loss, cross_entropy_loss, causal_lm_loss, default_margin, causal_lm_margin)


@dataclass(frozen=True)
class _BuildModel:
    """The task's model factory, with HF models switched to attention that ``vmap`` can run (see ``_hf``)."""

    factory: Callable[[], nn.Module]

    def __call__(self) -> nn.Module:
        return prepare_model(self.factory())


@dataclass(frozen=True, kw_only=True)
class Task:
    """What gradindex needs to know about a model and its data: a task file's factory returns one.

    Args:
        model: a zero-argument callable building the architecture (a class, a lambda); the weights come from
            the checkpoints. Hugging Face models it builds run with ``gradindex_sdpa`` attention (SDPA with the mask
            always built), which ``vmap`` can run.
        train: the map-style training set (``__len__``, ``__getitem__``); row i of the store is ``train[i]``. Items may
            be tuples (``(input, label)``, ``((x1, x2), label)``), dicts (``{"input_ids": ..., "labels": ...}``) or
            Hugging Face ``datasets`` rows; a pandas DataFrame or pyarrow Table is wrapped in a ``TableDataset``.
        test: the default query split (optional); more splits go in ``queries``.
        queries: further named query splits, e.g. ``{"val": val_ds}``.
        loss: ``loss(model, batch) -> Tensor[B]``, the per-sample loss of a collated batch; default ``default_loss``:
            the ecosystem's conventions (classification cross-entropy, the causal LM loss of HF ``*ForCausalLM``
            models, token cross-entropy, regression), with the model called as ``model(**inputs)`` for dict batches
            and ``model(*inputs)`` for tuples.
        margin: ``margin(model, batch) -> Tensor[B]``, the output function TRAK uses; default ``default_margin``: the
            classification margin (logit of the true class minus logsumexp of the others), per token for sequences.
        label: where the labels are when not by convention (a ``labels`` or ``label`` key, a tuple's last element):
            a dict key (``"target"``) or a tuple position (``0``). The default loss, margin, collate and the reports
            all follow it.
        pad_value: what the default collate pads variable-length inputs such as ``input_ids`` with (labels pad with
            -100, ``attention_mask`` with 0); default 0.
        tokenizer: optional, any object with ``decode(ids) -> str`` (an HF tokenizer): reports show text with it.
        sample_ids: one id per training sample (str or int); default: the row number.
        train_step: ``train_step(model, batch, optimizer) -> loss``, used by ``make_ensemble`` (default: SGD on
            ``loss``).
        regularization: ``regularization(model) -> scalar`` added to the training objective (influence functions'
            curvature).
        collate: the collate function of batches; default ``collate_samples`` (stacks tuples, dicts and HF rows,
            pads variable-length sequences, drops strings in dicts).
        name: a display name recorded in the manifest.

    Raises:
        TaskSpecError: a field is of the wrong kind (the message names it).

    ``Task.causal_lm(...)`` and ``Task.sequence_classification(...)`` make the Task of a Hugging Face model.
    """

    model: Callable[[], nn.Module]
    train: Any
    test: Any | None = None
    queries: Mapping[str, Any] = field(default_factory=dict)
    loss: Callable[[nn.Module, Any], Tensor] = default_loss
    margin: Callable[[nn.Module, Any], Tensor] = default_margin
    label: str | int | None = None
    pad_value: int | float = 0
    tokenizer: Any | None = None
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
        if not isinstance(self.model, _BuildModel):
            object.__setattr__(self, "model", _BuildModel(self.model))
        if is_table(self.train):
            object.__setattr__(self, "train", TableDataset(self.train))
        if self.test is not None and is_table(self.test):
            object.__setattr__(self, "test", TableDataset(self.test))
        if any(is_table(dataset) for dataset in self.queries.values()):
            queries = {key: TableDataset(value) if is_table(value) else value for key, value in self.queries.items()}
            object.__setattr__(self, "queries", queries)
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
        if self.label is not None and (isinstance(self.label, bool) or not isinstance(self.label, (str, int))):
            raise TaskSpecError(
                f"Task.label must be a dict key (str) or a tuple position (int), got {type(self.label).__name__}"
            )
        if isinstance(self.pad_value, bool) or not isinstance(self.pad_value, (int, float)):
            raise TaskSpecError(f"Task.pad_value must be a number, got {type(self.pad_value).__name__}")
        if self.tokenizer is not None and not callable(getattr(self.tokenizer, "decode", None)):
            raise TaskSpecError(
                f"Task.tokenizer must have a decode(ids) -> str method (an HF tokenizer), got "
                f"{type(self.tokenizer).__name__}"
            )
        if self.label is not None:  # the built-in losses and margins look for the label where the task says
            for attribute in ("loss", "margin"):
                function = getattr(self, attribute)
                if any(function is conventional for conventional in _CONVENTIONAL):
                    object.__setattr__(self, attribute, functools.partial(function, label=self.label))
        needs_own_collate = self.pad_value != 0 or (self.label is not None and self.label not in (*LABEL_KEYS, -1))
        if self.collate is None and needs_own_collate:
            object.__setattr__(
                self, "collate", functools.partial(collate_samples, pad_value=self.pad_value, label=self.label)
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

    def labels_of(self, batch: Any) -> Any:
        """The labels of a collated batch as numpy when they are per-sample scalars (``[B]``), else None; found where
        the default loss finds them."""
        return labels_of(batch, self.label)

    def logits_of(self, model: nn.Module, batch: Any) -> Tensor:
        """The model's logits (or outputs) for a collated batch, the model called as the default loss calls it."""
        return logits_of(model, batch, label=self.label)

    # ---- ready-made tasks of Hugging Face models --------------------------------------------------------------------
    @classmethod
    def causal_lm(
        cls,
        model: Any,
        train: Any,
        test: Any | None = None,
        *,
        tokenizer: Any | None = None,
        pad_value: int | None = None,
        name: str = "causal-lm",
        **fields: Any,
    ) -> Task:
        """The Task of a causal language model: per-sequence next-token loss, its margin, padding and labels set.

        Items are dicts (``input_ids``, optionally ``attention_mask`` and ``labels`` with -100 on the tokens not to
        score, e.g. a prompt) or HF ``datasets`` rows; without ``labels`` every real token is scored.

        Args:
            model: a zero-argument callable building the model, a ``transformers`` config, or a local folder with
                ``config.json`` (a ``save_pretrained`` folder): the architecture is built with
                ``AutoModelForCausalLM.from_config``; the weights come from the checkpoints.
            train: the training set (dict items, HF ``datasets`` rows, a DataFrame or pyarrow Table).
            test: the default query split (optional).
            tokenizer: optional, an object with ``decode(ids) -> str`` (an HF tokenizer), for the reports; its
                ``pad_token_id`` is the default ``pad_value``.
            pad_value: the ``input_ids`` padding; default the tokenizer's ``pad_token_id``, else the config's, else 0.
            name: a display name recorded in the manifest.
            **fields: any other Task field (``queries``, ``sample_ids``, ``label``, ``collate``, ``train_step``...).

        Returns:
            A Task with ``loss=causal_lm_loss`` and ``margin=causal_lm_margin``.
        """
        factory, config = _architecture(model, "AutoModelForCausalLM")
        fields.setdefault("loss", causal_lm_loss)
        fields.setdefault("margin", causal_lm_margin)
        return cls(
            model=factory,
            train=train,
            test=test,
            tokenizer=tokenizer,
            pad_value=_pad_value(pad_value, tokenizer, config),
            name=name,
            **fields,
        )

    @classmethod
    def sequence_classification(
        cls,
        model: Any,
        train: Any,
        test: Any | None = None,
        *,
        num_labels: int | None = None,
        tokenizer: Any | None = None,
        pad_value: int | None = None,
        name: str = "sequence-classification",
        **fields: Any,
    ) -> Task:
        """The Task of a sequence classifier (``*ForSequenceClassification``): per-sample cross-entropy (squared error
        for ``num_labels=1``, as HF's regression), the classification margin, padding set.

        Items are dicts (``input_ids``, optionally ``attention_mask``, ``token_type_ids``, and ``labels`` or
        ``label``) or HF ``datasets`` rows.

        Args:
            model: a zero-argument callable building the model, a ``transformers`` config, or a local folder with
                ``config.json``: the architecture is built with ``AutoModelForSequenceClassification.from_config``;
                the weights come from the checkpoints.
            train: the training set (dict items, HF ``datasets`` rows, a DataFrame or pyarrow Table).
            test: the default query split (optional).
            num_labels: the number of classes, set on the config (default: the config's).
            tokenizer: optional, an object with ``decode(ids) -> str`` (an HF tokenizer), for the reports; its
                ``pad_token_id`` is the default ``pad_value``.
            pad_value: the ``input_ids`` padding; default the tokenizer's ``pad_token_id``, else the config's, else 0
                (also set as the config's ``pad_token_id`` when it has none, which GPT-style classifiers need to find
                each sequence's last token).
            name: a display name recorded in the manifest.
            **fields: any other Task field (``queries``, ``sample_ids``, ``label``, ``collate``, ``train_step``...).

        Returns:
            A Task with ``loss=default_loss`` and ``margin=default_margin``.
        """
        factory, config = _architecture(model, "AutoModelForSequenceClassification", num_labels=num_labels)
        pad = _pad_value(pad_value, tokenizer, config)
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = int(pad)
        return cls(model=factory, train=train, test=test, tokenizer=tokenizer, pad_value=pad, name=name, **fields)


def _architecture(model: Any, auto_class: str, **overrides: Any) -> tuple[Callable[[], nn.Module], Any]:
    """The model factory and, when it is made from a config, that config (a copy the Task owns)."""
    if callable(model) and not isinstance(model, (str, Path)):
        if any(value is not None for value in overrides.values()):
            raise TaskSpecError(
                f"{', '.join(key for key, value in overrides.items() if value is not None)} applies to a config or a "
                "folder; set it in the model your callable builds"
            )
        return model, None
    config = hf_config(model, **overrides)
    return HFArchitecture(config, auto_class), config


def _pad_value(pad_value: int | None, tokenizer: Any, config: Any) -> int:
    for candidate in (pad_value, getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None)):
        if isinstance(candidate, int) and not isinstance(candidate, bool):
            return candidate
    return 0


def model_class_name(model: Any) -> str:
    """The name a store records for a model's class: ``module.qualname``, and for a class defined in a task file
    ``<file name>:<qualname>`` (its module's name is private to the process that loaded the file).

    Args:
        model: a model or its class.
    """
    cls = model if isinstance(model, type) else type(model)
    module = cls.__module__
    if module.startswith(TASK_FILE_PREFIX):
        file = getattr(sys.modules.get(module), "__file__", None)
        if file:
            return f"{Path(file).name}:{cls.__qualname__}"
    return f"{module}.{cls.__qualname__}"


def _task_file_module(path: Path) -> str:
    resolved = str(path.resolve())
    stem = re.sub(r"\W", "_", path.stem)
    return f"{TASK_FILE_PREFIX}{stem}_{hashlib.sha256(resolved.encode()).hexdigest()[:16]}"


def _import_hint(error: BaseException, folder: str) -> str:
    if isinstance(error, ModuleNotFoundError):
        return (
            f" (the task file's folder {folder} was on sys.path: a sibling module must sit in that folder, a package "
            "must be installed)"
        )
    return ""


def _load_file(target: str, spec: str) -> Any:
    path = Path(target)
    if not path.is_file():
        raise TaskSpecError(f"task file {target} does not exist; check the path in --task {spec}")
    module_name = _task_file_module(path)
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise TaskSpecError(f"cannot import {target} as a Python file; give a .py file")
    module = importlib.util.module_from_spec(module_spec)
    folder = str(path.resolve().parent)
    sys.modules[module_name] = module
    sys.path.insert(0, folder)  # like running the file as a script: its siblings are importable
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # the user's code failed: say where, keep the cause
        sys.modules.pop(module_name, None)
        raise TaskSpecError(
            f"importing task file {target} failed: {type(error).__name__}: {error}{_import_hint(error, folder)}"
        ) from error
    finally:
        if folder in sys.path:
            sys.path.remove(folder)  # the first occurrence: the one inserted above (unless the file removed it)
        if folder not in sys.path:
            sys.path.append(folder)  # for imports the task's functions make later, shadowing nothing installed
    return module


def _load_factory(spec: str) -> tuple[Callable[[], Any], str | None]:
    """The factory a spec names, and the task file's folder when it is a file."""
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
    folder = None
    if target.endswith(".py") or "/" in target or Path(target).is_file():
        module = _load_file(target, spec)
        folder = str(Path(target).resolve().parent)
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
    return factory, folder


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
    factory, folder = _load_factory(spec)
    try:
        task = factory(**options)
    except GradIndexError:
        raise
    except Exception as error:
        hint = _import_hint(error, folder) if folder else ""
        raise TaskSpecError(f"task factory {spec} raised {type(error).__name__}: {error}{hint}") from error
    if not isinstance(task, Task):
        raise TaskSpecError(f"task factory {spec} returned {type(task).__name__}, not a gradindex.Task")
    return task
