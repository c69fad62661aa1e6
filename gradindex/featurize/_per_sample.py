"""Per-sample gradients with torch.func: ``vmap(grad(loss))`` over a functional call of the model."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradindex.checkpoints import tied_aliases
from gradindex.errors import ArgumentError

__all__ = ["LossModule", "PerSampleGradients", "select_parameters"]


def select_parameters(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """Names of the trainable parameters matching any of the ``layers`` globs (all when None), in model order.

    A parameter registered under several names (tied weights, a shared module) is one parameter, named by its first
    name (``named_parameters()``'s); a glob matching any of its names selects it, so ``lm_head`` selects GPT-2's tied
    ``transformer.wte.weight``.

    Args:
        model: the task's model.
        layers: globs over parameter names or their module's name (``"2.*"``, ``"fc"``, ``"*.attn.*"``); None: all.

    Returns:
        The selected names, each once.

    Raises:
        ArgumentError: no trainable parameter matches.
    """
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    if not layers:
        selected = names
    else:
        every: dict[str, list[str]] = {name: [name] for name in names}
        for alias, name in tied_aliases(model).items():
            if name in every:
                every[name].append(alias)
        selected = [
            name
            for name in names
            if any(
                fnmatch.fnmatchcase(each, pattern) or fnmatch.fnmatchcase(each.rsplit(".", 1)[0], pattern)
                for each in every[name]
                for pattern in layers
            )
        ]
    if not selected:
        raise ArgumentError(
            "layers",
            f"layers {' '.join(layers or [])} match no trainable parameter; the model has {', '.join(names[:8])}"
            + (" ..." if len(names) > 8 else ""),
        )
    return selected


class LossModule(nn.Module):
    """Wraps ``loss(model, batch)`` as a module so functional_call can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss: Callable[[nn.Module, Any], Tensor]):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: Any) -> Tensor:
        return self.loss(self.model, batch)


class PerSampleGradients:
    """Flattened per-sample gradients of a loss w.r.t. chosen parameters: ``[B, p]``.

    The wrapped model is put in eval mode (no dropout, running BatchNorm statistics), so a sample's
    gradient does not depend on the rest of its batch.
    """

    def __init__(self, model: nn.Module, loss: Callable[[nn.Module, Any], Tensor], param_names: Sequence[str]):
        self.module = LossModule(model, loss).eval()
        self.param_names = list(param_names)
        self._compute = vmap(grad(self._sample_loss, argnums=1), in_dims=(0, None, None))

    def _sample_loss(self, sample: Any, params: dict[str, Tensor], constants: dict[str, Tensor]) -> Tensor:
        batch = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, sample)
        losses = functional_call(self.module, {**constants, **params}, (batch,))
        return losses.sum()

    def split_state(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Split a model state (``model.*`` keys of the wrapper) into the differentiated params and the constants."""
        wanted = {f"model.{name}" for name in self.param_names}
        params = {key: value for key, value in state.items() if key in wanted}
        constants = {key: value for key, value in state.items() if key not in wanted}
        return params, constants

    def __call__(self, batch: Any, params: dict[str, Tensor], constants: dict[str, Tensor]) -> Tensor:
        """Per-sample gradients of one batch: ``[B, p]`` in ``param_names`` order."""
        grads = self._compute(batch, params, constants)
        return torch.cat([grads[f"model.{name}"].flatten(1) for name in self.param_names], dim=1)
