"""``python -m benchmarks.transformers [--quick | --tiny] [--models gpt2 bert llama] [--threads N]``"""

from benchmarks.transformers._run import main

main()
