"""``python -m benchmarks.speed [--tiny]``: featurization and query speed, gradindex beside its peers, in one
process."""

from benchmarks.speed._run import main

main()
