"""The ``gradindex`` command line (installed as ``gradindex.cli``)."""

from ._main import cli, main

__all__ = ["cli", "main"]
