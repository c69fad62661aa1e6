"""What a resident server saves: ten CLI queries through ``gradindex serve`` against the same ten direct CLI queries.

python -m benchmarks.serve           # a 4,096-row task, ten queries each way, best of 3 rounds; writes results
python -m benchmarks.serve --tiny    # seconds; what the test suite runs (results not saved)

A task file written for this run (an MLP on random features, trained for two checkpoints; no task the project ships)
is built into a store with the default settings. ``gradindex serve STORE --port 0`` starts in a process of its own and
prints its URL first; then ten ``gradindex query --server URL --samples ...`` processes and ten
``gradindex query STORE --samples ...`` processes (the same samples, ``--format jsonl``) run one after another, each
timed from start to exit (what a user's script pays: the interpreter, imports, the request, the output). Every pair of
outputs must be byte-identical. The rounds alternate the two sides so that a change of the machine's load reaches
both; the server's own start (until its URL is printed) is reported beside, paid once.
"""

from benchmarks.serve._run import run

__all__ = ["run"]
