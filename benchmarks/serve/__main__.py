"""python -m benchmarks.serve [--tiny]"""

from __future__ import annotations

import argparse

from benchmarks.serve import __doc__ as doc
from benchmarks.serve import run


def main() -> None:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run (results not saved)")
    run(tiny=parser.parse_args().tiny)


if __name__ == "__main__":
    main()
