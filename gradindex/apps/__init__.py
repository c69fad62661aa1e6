"""Programs built on the pipeline: ``curate`` (which samples to keep, ``curation``), ``report`` (one HTML page,
``html_report``) and the ``demo``. Each loads with its first use (they need torch); ``DEMOS`` and ``CURATE_BY`` are
light."""

from typing import TYPE_CHECKING

from gradindex.apps._catalog import CURATE_BY, DEMOS
from gradindex.utils import lazy_exports

__all__ = ["CURATE_BY", "DEMOS", "curate", "report", "run_demo", "run_gpt2_demo"]

if TYPE_CHECKING:  # loaded on first use (lazy_exports)
    from gradindex.apps.curation import curate
    from gradindex.apps.demo import run_demo, run_gpt2_demo
    from gradindex.apps.html_report import report

__getattr__, __dir__ = lazy_exports(__name__)
