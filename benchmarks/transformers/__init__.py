"""Transformers benchmark (issue 15's targets): projection fidelity of the default (kron) projection against exact
TracIn-CP on a tiny tied GPT-2, a BERT classifier, a Llama-style LM and a wider GPT-2, sjlt beside it; build speed on
the tiny GPT-2 against a training epoch.

python -m benchmarks.transformers            # the full run (minutes on 2 cores); results/transformers.json, .png,
                                             # the transformers section of RESULTS.md
python -m benchmarks.transformers --quick    # a few minutes, without gpt2-wide; prints the section, writes nothing
python -m benchmarks.transformers --tiny     # seconds, prints, writes nothing; what tests/benchmarks runs
"""
