"""python -m benchmarks.metadata_scale [--shards 100000] [--moto-shards 3000] [--tiny]"""

from __future__ import annotations

import argparse

from benchmarks.metadata_scale import __doc__ as doc
from benchmarks.metadata_scale import run


def main() -> None:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--moto-shards", type=int, default=3000, help="the largest store simulated on S3 (moto)")
    parser.add_argument("--tiny", action="store_true", help="200 shards, seconds long (results not saved)")
    args = parser.parse_args()
    run(shards=args.shards, moto_shards=args.moto_shards, tiny=args.tiny)


if __name__ == "__main__":
    main()
