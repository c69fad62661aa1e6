"""The default loss and margin: the conventions of the ecosystem, so a model and data that train elsewhere work here.

How a batch reaches the model (``model_outputs``):

* a dict batch is called as ``model(**inputs)`` with only the keys the model's ``forward`` names (as Hugging Face's
  ``Trainer`` does by signature); the label key is left out unless ``forward`` requires it (HF models given labels
  compute their own *mean* loss, and gradindex needs one loss per sample); a ``forward`` that names none of the keys
  and the batch has one input: that input, positionally; a ``forward(**kwargs)``: every input;
* a tuple batch as ``model(*inputs)`` — every element but the label; a single input that is itself a tuple, for a
  ``forward`` that requires that many positional arguments, is unpacked (items ``((x1, x2), y)`` call
  ``model(x1, x2)``);
* a tensor batch as ``model(batch)``.

What comes back may be a tensor, a dict with ``logits``, or an object with ``.logits`` (HF's ``ModelOutput``).

Which loss (``default_loss``), from the model and the shapes and dtypes of the logits and labels — never their values,
so everything runs under ``torch.func.vmap`` (masks instead of boolean indexing, no ``.item()``):

* a causal language model — an HF class named ``*ForCausalLM`` or ``*LMHeadModel``, or any model given
  ``causal_lm_loss`` — gets the shifted next-token cross-entropy, averaged over the tokens whose label is not -100
  (labels default to ``input_ids`` with padding, ``attention_mask == 0``, set to -100);
* integer labels ``[B]`` with logits ``[B, C]``: cross-entropy per sample (a label of -100 gives 0);
* integer labels ``[B, T]`` with logits ``[B, T, C]``: token cross-entropy (not shifted: token classification,
  masked LM) averaged over the labeled tokens;
* floating labels of the logits' shape (or ``[B]`` with logits ``[B, 1]``, whatever the labels' dtype): the squared
  error averaged over each sample's outputs (HF's regression, ``num_labels=1``); an HF config's ``problem_type``
  (``multi_label_classification``: binary cross-entropy with logits) is followed when set.

Anything else is a TaskSpecError that names ``Task(loss=...)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gradindex.errors import TaskSpecError
from gradindex.task._batches import split_batch
from gradindex.task._collate import IGNORE_INDEX

__all__ = [
    "causal_lm_loss",
    "causal_lm_margin",
    "cross_entropy_loss",
    "default_loss",
    "default_margin",
    "is_causal_lm",
    "logits_of",
    "model_outputs",
]

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_SIGNATURES: dict[Any, inspect.Signature | None] = {}


def is_causal_lm(model: Any) -> bool:
    """Whether the default loss treats ``model`` as a causal LM: an HF-style class named ``*ForCausalLM`` or
    ``*LMHeadModel`` (``GPT2LMHeadModel``, ``LlamaForCausalLM``); any other model needs ``causal_lm_loss`` named."""
    return type(model).__name__.endswith(_CAUSAL_SUFFIXES)


# ---- calling the model -----------------------------------------------------------------------------------------------
def _signature(model: Any) -> inspect.Signature | None:
    function = type(model).forward if isinstance(model, nn.Module) else model
    if function not in _SIGNATURES:
        try:
            target = model.forward if isinstance(model, nn.Module) else model
            _SIGNATURES[function] = inspect.signature(target)
        except (TypeError, ValueError):  # a builtin without a signature: call it as given
            _SIGNATURES[function] = None
    return _SIGNATURES[function]


def _call(model: Any, inputs: tuple | dict, labels: Any, label_key: str | None) -> Any:
    signature = _signature(model)
    parameters = signature.parameters if signature is not None else {}
    if isinstance(inputs, dict):
        named = {
            name: parameter
            for name, parameter in parameters.items()
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        }
        if signature is None or not named:
            kwargs = dict(inputs)
        else:
            kwargs = {key: value for key, value in inputs.items() if key in named}
            if label_key in named and named[label_key].default is inspect.Parameter.empty:
                kwargs[label_key] = labels  # this forward requires its labels
            if not kwargs and len(inputs) == 1:
                return model(next(iter(inputs.values())))
        if not kwargs:
            raise TaskSpecError(
                f"the model's forward takes ({', '.join(named)}) but the batch has the keys "
                f"({', '.join(map(str, inputs))}); name the batch's keys after forward's arguments, or give "
                "Task(loss=...)"
            )
        return model(**kwargs)
    args = tuple(inputs)
    if len(args) == 1 and isinstance(args[0], (tuple, list)) and signature is not None:
        required = [
            parameter
            for parameter in parameters.values()
            if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
            and parameter.default is inspect.Parameter.empty
        ]
        if len(required) == len(args[0]) >= 2:
            args = tuple(args[0])
    return model(*args)


def _logits(outputs: Any) -> Tensor:
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    kind = type(outputs).__name__
    keys = f" with keys {', '.join(map(str, outputs))}" if isinstance(outputs, Mapping) else ""
    raise TaskSpecError(
        f"the model returned a {kind}{keys}; the default loss reads a tensor, a dict with 'logits' or an object with "
        ".logits: give Task(loss=...) (and Task(margin=...) for trak)"
    )


def model_outputs(model: Any, batch: Any, *, label: str | int | None = None) -> Any:
    """What ``model`` returns for ``batch``, called by the conventions of the module docstring (labels left out).

    Args:
        model: the model (an ``nn.Module`` or any callable).
        batch: a collated batch (dict, tuple or tensor).
        label: the dict key or tuple position of the labels (``Task.label``); None follows the conventions.

    Returns:
        The model's own outputs (a tensor, a dict, an HF ``ModelOutput``...).
    """
    inputs, labels = split_batch(batch, label)
    return _call(model, inputs, labels, _label_key(batch, label))


def logits_of(model: Any, batch: Any, *, label: str | int | None = None) -> Tensor:
    """The logits (or outputs) of ``model`` for ``batch``, as the default loss sees them: ``[B, C]``, ``[B, T, V]``...

    Args:
        model: the model (an ``nn.Module`` or any callable).
        batch: a collated batch (dict, tuple or tensor).
        label: the dict key or tuple position of the labels (``Task.label``); None follows the conventions.

    Returns:
        The model's output tensor, its ``logits`` entry or its ``.logits``.

    Raises:
        TaskSpecError: the model returns something else.
    """
    return _logits(model_outputs(model, batch, label=label))


def _label_key(batch: Any, label: str | int | None) -> str | None:
    if not isinstance(batch, Mapping):
        return None
    if isinstance(label, str):
        return label
    return next((key for key in ("labels", "label") if key in batch), None)


def _forward(model: Any, batch: Any, label: str | int | None) -> tuple[Tensor, Any, tuple | dict]:
    inputs, labels = split_batch(batch, label)
    logits = _logits(_call(model, inputs, labels, _label_key(batch, label)))
    return logits, labels, inputs


# ---- losses ----------------------------------------------------------------------------------------------------------
def _no_rule(what: str, logits: Tensor, labels: Any, name: str = "loss") -> TaskSpecError:
    shown = f"labels {tuple(labels.shape)} {labels.dtype}" if isinstance(labels, Tensor) else "no labels"
    return TaskSpecError(
        f"the default {name} has no rule for {what} (logits {tuple(logits.shape)}, {shown}); give Task({name}=...)"
    )


def _token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over each sample's labeled positions: logits ``[B, T, C]``, labels ``[B, T]`` -> ``[B]``."""
    labels = labels.long()
    token = nn.functional.cross_entropy(
        logits.float().movedim(-1, 1), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    valid = (labels != IGNORE_INDEX).to(token.dtype)
    dims = tuple(range(1, token.ndim))
    return (token * valid).sum(dim=dims) / valid.sum(dim=dims).clamp(min=1.0)


def _lm_labels(logits: Tensor, labels: Any, inputs: tuple | dict) -> Tensor:
    if labels is None:
        if isinstance(inputs, dict):
            if "input_ids" not in inputs:
                raise TaskSpecError(
                    "a causal LM batch has neither labels nor input_ids; give labels, or Task(loss=...)"
                )
            labels = inputs["input_ids"]
            if "attention_mask" in inputs:
                labels = labels.masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
        else:
            labels = inputs[0]
    if not isinstance(labels, Tensor) or labels.is_floating_point() or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise _no_rule("a causal LM whose labels are not token ids of the logits' [B, T]", logits, labels)
    return labels


def _shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The logits at positions 0..T-2 and the labels they predict, 1..T-1."""
    return logits[:, :-1], labels[:, 1:]


def causal_lm_loss(model: Any, batch: Any, *, label: str | int | None = None) -> Tensor:
    """Per-sequence causal LM loss ``[B]``: shifted next-token cross-entropy, mean over the tokens labeled (not -100).

    Labels are the batch's (``labels`` key, the tuple's last element, or ``Task.label``); without them, ``input_ids``
    (or the single tuple input) with padding (``attention_mask == 0``) set to -100. Setting a prompt's labels to -100
    scores only its completion. Averaged over a batch, the losses of one-sample batches equal HF's ``outputs.loss``.

    Args:
        model: a model returning logits ``[B, T, V]`` (a tensor, a dict with ``logits``, an HF ``ModelOutput``).
        batch: a collated batch.
        label: the dict key or tuple position of the labels; None follows the conventions.
    """
    logits, labels, inputs = _forward(model, batch, label)
    return _token_cross_entropy(*_shifted(logits, _lm_labels(logits, labels, inputs)))


def cross_entropy_loss(model: Any, batch: Any, *, label: str | int | None = None) -> Tensor:
    """Per-sample cross-entropy ``[B]``: logits ``[B, C]`` against labels ``[B]`` (a label of -100 gives 0), or the mean
    token cross-entropy of logits ``[B, T, C]`` against labels ``[B, T]`` over the labeled tokens (not shifted).

    Args:
        model: the model; called by the conventions of the module docstring.
        batch: a collated batch.
        label: the dict key or tuple position of the labels; None follows the conventions.
    """
    logits, labels, _ = _forward(model, batch, label)
    return _classification(logits, labels)


def _classification(logits: Tensor, labels: Any) -> Tensor:
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
        raise _no_rule("cross-entropy without integer labels", logits, labels)
    if logits.ndim != labels.ndim + 1 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise _no_rule("labels that are not the logits' shape without the class dimension", logits, labels)
    if labels.ndim == 1:
        return nn.functional.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE_INDEX, reduction="none")
    return _token_cross_entropy(logits, labels)


def _problem_type(model: Any) -> str | None:
    return getattr(getattr(model, "config", None), "problem_type", None)


def default_loss(model: Any, batch: Any, *, label: str | int | None = None) -> Tensor:
    """The default per-sample loss of a Task ``[B]``: the convention of the module docstring that fits the model, the
    logits and the labels (causal LM, classification, token classification, regression).

    Args:
        model: the model; called by the conventions of the module docstring.
        batch: a collated batch (dict, tuple or tensor).
        label: the dict key or tuple position of the labels (``Task.label``); None follows the conventions.

    Raises:
        TaskSpecError: no convention fits; give ``Task(loss=...)``.
    """
    logits, labels, inputs = _forward(model, batch, label)
    if is_causal_lm(model):
        return _token_cross_entropy(*_shifted(logits, _lm_labels(logits, labels, inputs)))
    if not isinstance(labels, Tensor):
        raise TaskSpecError(
            "the default loss found no labels in the batch (a 'labels' or 'label' key, or a tuple's last element); "
            "name them with Task(label=...) or give Task(loss=...)"
        )
    problem = _problem_type(model)
    if problem == "multi_label_classification" and labels.shape == logits.shape:
        losses = nn.functional.binary_cross_entropy_with_logits(
            logits.float(), labels.to(torch.float32), reduction="none"
        )
        return losses.reshape(losses.shape[0], -1).mean(dim=1)
    one_output = logits.ndim == labels.ndim + 1 and logits.shape[-1] == 1 and logits.shape[:-1] == labels.shape
    if problem == "regression" or labels.is_floating_point() or one_output:
        if one_output:
            logits = logits.squeeze(-1)
        if tuple(logits.shape) != tuple(labels.shape):
            raise _no_rule("regression targets of another shape than the outputs", logits, labels)
        errors = (logits.float() - labels.to(torch.float32)) ** 2
        return errors.reshape(errors.shape[0], -1).mean(dim=1)
    return _classification(logits, labels)


# ---- margins (TRAK's output function) --------------------------------------------------------------------------------
def _margins(logits: Tensor, labels: Tensor) -> Tensor:
    """Logit of the label minus logsumexp of the others, per position (a mask, not in-place indexing: vmap-safe)."""
    mask = labels.long().unsqueeze(-1) == torch.arange(logits.shape[-1], device=logits.device)
    logits = logits.float()
    correct = logits.masked_fill(~mask, 0.0).sum(dim=-1)
    return correct - torch.logsumexp(logits.masked_fill(mask, float("-inf")), dim=-1)


def _sequence_margin(logits: Tensor, labels: Tensor) -> Tensor:
    valid = labels != IGNORE_INDEX
    margins = _margins(logits, labels.masked_fill(~valid, 0)).masked_fill(~valid, 0.0)
    dims = tuple(range(1, margins.ndim))
    return margins.sum(dim=dims) / valid.to(margins.dtype).sum(dim=dims).clamp(min=1.0)


def causal_lm_margin(model: Any, batch: Any, *, label: str | int | None = None) -> Tensor:
    """TRAK's output function for a causal LM ``[B]``: the per-token margin of the next token (its logit minus the
    logsumexp of the others), averaged over the labeled tokens; labels as ``causal_lm_loss`` finds them.

    Args:
        model: a model returning logits ``[B, T, V]``.
        batch: a collated batch.
        label: the dict key or tuple position of the labels; None follows the conventions.
    """
    logits, labels, inputs = _forward(model, batch, label)
    return _sequence_margin(*_shifted(logits, _lm_labels(logits, labels, inputs)))


def default_margin(model: Any, batch: Any, *, label: str | int | None = None) -> Tensor:
    """TRAK's output function ``[B]``: for classification the logit of the true class minus the logsumexp of the
    others; for sequences (causal LMs shifted, as the default loss) that margin per token, averaged over the labeled
    tokens.

    Args:
        model: the model; called by the conventions of the module docstring.
        batch: a collated batch.
        label: the dict key or tuple position of the labels (``Task.label``); None follows the conventions.

    Raises:
        TaskSpecError: the outputs are not classification logits; give ``Task(margin=...)``.
    """
    logits, labels, inputs = _forward(model, batch, label)
    if is_causal_lm(model):
        return _sequence_margin(*_shifted(logits, _lm_labels(logits, labels, inputs)))
    if (
        not isinstance(labels, Tensor)
        or labels.is_floating_point()
        or logits.ndim != labels.ndim + 1
        or tuple(logits.shape[:-1]) != tuple(labels.shape)
        or logits.shape[-1] < 2
    ):
        raise _no_rule("anything but classification logits and integer labels", logits, labels, "margin")
    if labels.ndim == 1:
        return _margins(logits, labels)
    return _sequence_margin(logits, labels)
