"""The reliability suite's session fixture (``env``) lives in rel_fixtures; this makes it one per session."""

from reliability.rel_fixtures import env  # noqa: F401
