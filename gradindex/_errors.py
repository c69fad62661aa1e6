"""The errors gradindex raises: each is ours and also the builtin it resembles."""

from __future__ import annotations

__all__ = [
    "GradIndexError",
    "TaskSpecError",
    "CheckpointError",
    "StoreNotFoundError",
    "StoreExistsError",
    "IncompatibleStoreError",
    "IncompleteStoreError",
    "CorruptStoreError",
    "ShardOwnershipError",
    "NonFiniteError",
    "SearchError",
    "GradIndexWarning",
]


class GradIndexError(Exception):
    """Base of every error gradindex raises on purpose; its message names the fix."""


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


class GradIndexWarning(UserWarning):
    """A result was computed but may be inaccurate (e.g. an iterative solver that did not converge); the message names the fix."""
