"""python -m benchmarks.memory_budget [--rows N] [--dim D] [--rows-per-shard R] [--compare-tree DIR] [--tiny]"""

from __future__ import annotations

import argparse

from benchmarks.memory_budget import __doc__ as doc
from benchmarks.memory_budget import run


def main() -> None:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--rows-per-shard", type=int, default=200_000)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run (results not saved)")
    parser.add_argument(
        "--compare-tree", help="a folder with another version's gradindex/ (git archive REV gradindex | tar -x -C DIR)"
    )
    args = parser.parse_args()
    run(
        rows=args.rows,
        dim=args.dim,
        rows_per_shard=args.rows_per_shard,
        tiny=args.tiny,
        compare_tree=args.compare_tree,
    )


if __name__ == "__main__":
    main()
