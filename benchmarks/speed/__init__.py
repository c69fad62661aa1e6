"""Speed benchmark: gradindex kron/sjlt/dense featurization beside Captum, TRAK, dattri and the training step; exact
search beside BLAS.

python -m benchmarks.speed            # the full run (minutes on 2 cores); results/speed.json, speed.png, RESULTS.md
python -m benchmarks.speed --tiny     # seconds; what tests/benchmarks runs
"""
