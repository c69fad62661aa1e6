"""Programs built on the pipeline: ``curate`` (which samples to keep, ``curation``), ``report`` (one HTML page,
``html_report``) and the ``demo``."""

from gradindex.apps.curation import curate
from gradindex.apps.demo import DEMOS, run_demo, run_gpt2_demo
from gradindex.apps.html_report import report

__all__ = ["DEMOS", "curate", "report", "run_demo", "run_gpt2_demo"]
