"""The user's side: a ``Task`` names the model, the data and the loss; batches are made and handled the one way here.

``load_task`` reads a ``--task SPEC`` (``file.py:factory``, ``module:factory`` or a built-in name); the batch rules
(``collate_samples``, ``batch_size``, ``slice_batch``, ``to_device``, ``gather_batch``, ``split_batch``) and the
loaders (``iter_batches``) are what every featurizer, method and pipeline step uses, so a two-input model or a dict
batch works the same everywhere; the default loss and margin (``default_loss``, ``default_margin``) follow the
conventions of Hugging Face and PyTorch models; ``TableDataset`` adapts pandas, Arrow and HF ``datasets`` tables.
"""

from gradindex.task._batches import batch_size, gather_batch, labels_of, slice_batch, split_batch, to_device
from gradindex.task._collate import collate_samples
from gradindex.task._conventions import (
    causal_lm_loss,
    causal_lm_margin,
    cross_entropy_loss,
    default_loss,
    default_margin,
    is_causal_lm,
    logits_of,
    model_outputs,
)
from gradindex.task._failures import running_user_code, user_code_error
from gradindex.task._hf import VMAP_SAFE_ATTENTION, prepare_model
from gradindex.task._loading import iter_batches, tensor_rows
from gradindex.task._tables import TableDataset
from gradindex.task._task import BUILTIN_TASKS, TASK_FILE_PREFIX, Task, load_task, model_class_name

__all__ = [
    "BUILTIN_TASKS",
    "TASK_FILE_PREFIX",
    "VMAP_SAFE_ATTENTION",
    "TableDataset",
    "Task",
    "batch_size",
    "causal_lm_loss",
    "causal_lm_margin",
    "collate_samples",
    "cross_entropy_loss",
    "default_loss",
    "default_margin",
    "gather_batch",
    "is_causal_lm",
    "iter_batches",
    "labels_of",
    "load_task",
    "logits_of",
    "model_class_name",
    "model_outputs",
    "prepare_model",
    "running_user_code",
    "slice_batch",
    "split_batch",
    "tensor_rows",
    "to_device",
    "user_code_error",
]
