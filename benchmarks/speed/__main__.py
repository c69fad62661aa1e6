"""``python -m benchmarks.speed [--quick | --tiny]``: what indexing a training set costs end to end, gradindex's
build beside a training epoch and its peers, in one process; scaling curves; exact search speed."""

from benchmarks.speed._run import main

main()
