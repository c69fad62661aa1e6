"""The user's side: a ``Task`` names the model, the data and the loss; batches are made and handled the one way here.

``load_task`` reads a ``--task SPEC`` (``file.py:factory``, ``module:factory`` or a built-in name); the batch rules
(``batch_size``, ``slice_batch``, ``to_device``, ``gather_batch``) and the loaders (``iter_batches``) are what every
featurizer, method and pipeline step uses, so a two-input model or a dict batch works the same everywhere.
"""

from gradindex.task._batches import batch_size, gather_batch, labels_of, slice_batch, to_device
from gradindex.task._failures import running_user_code, user_code_error
from gradindex.task._loading import iter_batches, tensor_rows
from gradindex.task._task import BUILTIN_TASKS, Task, cross_entropy_loss, default_margin, load_task

__all__ = [
    "BUILTIN_TASKS",
    "Task",
    "batch_size",
    "cross_entropy_loss",
    "default_margin",
    "gather_batch",
    "iter_batches",
    "labels_of",
    "load_task",
    "running_user_code",
    "slice_batch",
    "tensor_rows",
    "to_device",
    "user_code_error",
]
