"""Hugging Face models as a Task sees them: architectures from configs, and attention that ``vmap`` can run.

``transformers`` is an optional extra (``pip install "gradindex[hf]"``): it is imported here only when a task uses it.

Why the attention switch: transformers builds its attention masks with shortcuts that read the mask's values
(``if padding_mask.all(): skip the mask``), which ``torch.func.vmap`` — the per-sample gradients — cannot run. Every
model a Task builds that uses SDPA or eager attention is switched to ``gradindex_sdpa``: transformers' SDPA attention
with the mask always built and SDPA's math backend (plain matmuls and softmax, which vmap batches; the fused CPU kernel
has no batching rule, and vmap would loop over the samples: about 2x slower per-sample gradients on a small GPT-2).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gradindex.errors import TaskSpecError

__all__ = ["VMAP_SAFE_ATTENTION", "HFArchitecture", "hf_config", "prepare_model", "require_transformers"]

VMAP_SAFE_ATTENTION = "gradindex_sdpa"
_registered = False


def require_transformers() -> Any:
    """The ``transformers`` module, or a TaskSpecError that says how to install it."""
    try:
        import transformers
    except ImportError as error:
        raise TaskSpecError('Hugging Face models need transformers: pip install "gradindex[hf]"') from error
    return transformers


def _register() -> bool:
    """Register ``gradindex_sdpa`` with transformers' attention and mask interfaces; False on a transformers without
    them (before 4.53), whose models are left as they are."""
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False

    def vmap_safe_attention(*args: Any, **kwargs: Any) -> Any:
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa_attention_forward(*args, **kwargs)

    def vmap_safe_mask(*args: Any, **kwargs: Any) -> Any:
        # never skip building the mask: deciding to skip reads the mask's values (a data-dependent branch)
        kwargs["allow_is_causal_skip"] = False
        kwargs["allow_is_bidirectional_skip"] = False
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(VMAP_SAFE_ATTENTION, vmap_safe_attention)
    AttentionMaskInterface.register(VMAP_SAFE_ATTENTION, vmap_safe_mask)
    _registered = True
    return True


def prepare_model(model: Any) -> Any:
    """``model``, with every transformers model in it (itself, or one it wraps) that uses SDPA or eager attention and
    supports SDPA switched to ``gradindex_sdpa`` attention; a model without any is returned as it is."""
    transformers = sys.modules.get("transformers")  # a transformers model cannot exist before transformers is imported
    if transformers is None or not isinstance(model, nn.Module):
        return model
    for module in model.modules():
        if not isinstance(module, transformers.PreTrainedModel):
            continue
        implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if implementation not in ("sdpa", "eager") or not getattr(module, "_supports_sdpa", False):
            continue
        can_set = getattr(module, "_can_set_attn_implementation", None)
        if callable(can_set) and not can_set():
            continue
        if not _register():
            return model
        module.set_attn_implementation(VMAP_SAFE_ATTENTION)
    return model


def hf_config(source: Any, **overrides: Any) -> Any:
    """A transformers config from a config object or a local folder holding ``config.json`` (never a hub name).

    Args:
        source: a ``transformers.PretrainedConfig`` or the path of a folder with ``config.json`` (``save_pretrained``).
        **overrides: config attributes to set (``num_labels=3``); the caller's config object is copied, not changed.
    """
    transformers = require_transformers()
    if isinstance(source, transformers.PretrainedConfig):
        config = copy.deepcopy(source)
    elif isinstance(source, (str, Path)):
        folder = Path(source)
        if not (folder / "config.json").is_file():
            raise TaskSpecError(
                f"{source} is not a folder with a config.json; give a save_pretrained folder, a transformers config or "
                "a zero-argument callable building the model"
            )
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    else:
        raise TaskSpecError(
            f"a Hugging Face model must be a zero-argument callable, a transformers config or a folder with "
            f"config.json, got {type(source).__name__}"
        )
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    return config


@dataclass(frozen=True)
class HFArchitecture:
    """A zero-argument callable building an HF architecture from its config (random weights: the checkpoints bring
    the trained ones), e.g. ``HFArchitecture(config, "AutoModelForCausalLM")``."""

    config: Any
    auto_class: str

    def __call__(self) -> nn.Module:
        transformers = require_transformers()
        return getattr(transformers, self.auto_class).from_config(self.config)
