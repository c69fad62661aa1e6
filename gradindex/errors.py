"""The errors gradindex raises: each is ours and also the builtin it resembles.

Every error a user can cause is a ``GradIndexError`` whose message is one sentence that names the fix.
``ArgumentError`` names the Python argument that is wrong (``top must be a positive integer, got 0``);
the command line shows the same message with the argument's flag in its place (``--top``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

__all__ = [
    "ArgumentError",
    "CheckpointError",
    "CorruptStoreError",
    "GradIndexError",
    "GradIndexWarning",
    "IncompatibleStoreError",
    "IncompleteStoreError",
    "NonFiniteError",
    "ResourceLimitError",
    "SearchError",
    "ShardOwnershipError",
    "StorageError",
    "StoreExistsError",
    "StoreNotFoundError",
    "StoreWriteError",
    "TaskSpecError",
    "with_flags",
]


class GradIndexError(Exception):
    """Base of every error gradindex raises on purpose; its message names the fix."""


class ArgumentError(GradIndexError, ValueError):
    """A bad value for a Python argument (or a setting): ``argument`` is its name, and the message starts with it
    (``top must be a positive integer, got 0``); other arguments it names are written ``name=value``, and listed in
    ``arguments``. ``with_flags`` says the same with the command line's flags (``--top``, ``--overwrite``)."""

    def __init__(self, argument: str, message: str, *, also: Sequence[str] = ()):
        super().__init__(message)
        self.argument = argument
        self.arguments = (argument, *also)

    def with_flags(self, flags: Mapping[str, str]) -> str:
        """The message said with ``flags`` (Python name -> flag): see ``with_flags``."""
        return with_flags(str(self), {name: flags[name] for name in self.arguments if name in flags}, self.argument)


def with_flags(message: str, flags: Mapping[str, str], subject: str | None = None) -> str:
    """``message`` with the arguments it names said as flags: the leading ``subject`` (``top must be`` -> ``--top must
    be``) and every ``name=value`` of a name in ``flags`` (``proj_dim=4`` -> ``--proj-dim 4``, ``overwrite=True`` ->
    ``--overwrite``). Other words are left alone, so prose may use the same words."""
    lead = flags.get(subject or "")
    if lead and re.match(rf"{re.escape(subject)}\b(?!=)", message):
        message = lead + message[len(subject) :]
    for name in sorted(flags, key=len, reverse=True):
        flag = flags[name]
        message = re.sub(rf"(?<![\w.@/-]){re.escape(name)}=True\b", flag, message)
        message = re.sub(rf"(?<![\w.@/-]){re.escape(name)}=(?=[\w'\"./({{\[-])", f"{flag} ", message)
    return message


class TaskSpecError(GradIndexError, ValueError):
    """A --task SPEC that cannot be loaded or does not return a gradindex.Task."""


class CheckpointError(GradIndexError, ValueError):
    """A checkpoint that cannot be parsed, found, or loaded into the task's model."""


class StoreNotFoundError(GradIndexError, FileNotFoundError):
    """No gradindex store at the given path."""


class StoreExistsError(GradIndexError, FileExistsError):
    """A store already exists where a new one would be created."""


class IncompatibleStoreError(GradIndexError, ValueError):
    """The store's manifest disagrees with what this call asks for (the field is named)."""


class IncompleteStoreError(GradIndexError, RuntimeError):
    """The store's build has not finished."""


class CorruptStoreError(GradIndexError, OSError):
    """A file of the store is missing, truncated or fails its checksum."""


class ShardOwnershipError(GradIndexError, RuntimeError):
    """Another writer owns (or has finished) the shard this writer asked for."""


class NonFiniteError(GradIndexError, ValueError):
    """NaN or infinite values where finite ones are required."""


class SearchError(GradIndexError, RuntimeError):
    """FAISS failed, or an index does not match its store."""


class StoreWriteError(GradIndexError, OSError):
    """Writing a store file failed (disk full, I/O error, ...); what was finished is kept."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code


class StorageError(GradIndexError, ValueError):
    """A store location that cannot be used: unknown protocol, missing package, bad storage option."""


class ResourceLimitError(GradIndexError, MemoryError):
    """Settings whose working memory cannot fit, refused before anything is allocated (the estimate and the limit are
    in the message, with the setting that lowers it)."""


class GradIndexWarning(UserWarning):
    """A result was computed but may be inaccurate (e.g. an iterative solver that did not converge); the message names
    the fix."""
