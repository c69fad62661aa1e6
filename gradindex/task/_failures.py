"""What the task's own code (its data, model and loss) raises becomes one sentence that says where it failed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from gradindex.errors import GradIndexError, TaskSpecError

__all__ = ["running_user_code", "user_code_error"]

_ADVICE = "check the labels (in range for the model's outputs), the inputs' shapes and dtypes, and the loss"


def user_code_error(where: str, error: BaseException) -> TaskSpecError:
    """The TaskSpecError for ``error`` raised by the task's data, model or loss while working on ``where``."""
    text = " ".join(str(error).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return TaskSpecError(f"the task's data, model or loss failed on {where}: {type(error).__name__}: {text}; {_ADVICE}")


@contextlib.contextmanager
def running_user_code(where: str) -> Iterator[None]:
    """Within the block, an error other than gradindex's own is the task's: re-raised as ``user_code_error``."""
    try:
        yield
    except GradIndexError:
        raise
    except (MemoryError, RecursionError):
        raise
    except Exception as error:
        raise user_code_error(where, error) from error
