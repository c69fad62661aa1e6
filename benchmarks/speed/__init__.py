"""Speed benchmark: gradindex's end-to-end build beside one training epoch and beside Captum, TRAK, dattri,
kronfluence and Bergson on the same models and k; build time against N and width; exact search beside BLAS.

python -m benchmarks.speed            # the full run (~25 min on 2 quiet cores): results/speed.json, .png, RESULTS.md
python -m benchmarks.speed --quick    # a tenth of the sizes (development); writes results/speed-quick.*
python -m benchmarks.speed --tiny     # seconds; what tests/benchmarks runs
"""
