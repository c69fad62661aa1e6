"""Programs built on the pipeline: ``curate`` (which samples to keep, ``curation``), ``report`` (one HTML page,
``html_report``), the ``demo`` and ``serve`` (a store kept resident behind Arrow Flight, ``serving``) with its client
``connect``. Each loads with its first use (they need torch, except ``connect``); ``DEMOS`` and ``CURATE_BY`` are
light."""

from typing import TYPE_CHECKING

from gradindex.apps._catalog import CURATE_BY, DEMOS
from gradindex.utils import lazy_exports

__all__ = [
    "CURATE_BY",
    "DEMOS",
    "Client",
    "Server",
    "connect",
    "curate",
    "report",
    "run_demo",
    "run_gpt2_demo",
    "serve",
]

if TYPE_CHECKING:  # loaded on first use (lazy_exports)
    from gradindex.apps.client import Client, connect
    from gradindex.apps.curation import curate
    from gradindex.apps.demo import run_demo, run_gpt2_demo
    from gradindex.apps.html_report import report
    from gradindex.apps.serving import Server, serve

__getattr__, __dir__ = lazy_exports(__name__)
