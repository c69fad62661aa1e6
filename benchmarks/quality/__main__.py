"""``python -m benchmarks.quality [--fast] [--experiments loo,lds,mislabel,projection] [--seeds 0,1,2] [--methods
...]``"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _names(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__)
    parser.add_argument("--fast", action="store_true", help="the CI subset: one seed, the smallest settings")
    parser.add_argument("--experiments", help="comma-separated subset of loo,lds,mislabel,projection")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; --fast: 0)")
    parser.add_argument(
        "--methods", help="comma-separated method configurations (default: all; see _methods.METHOD_CONFIGS)"
    )
    parser.add_argument("--settings", help="comma-separated settings to restrict to (e.g. mnist-lr,digits-mlp-noisy)")
    parser.add_argument("--workdir", help="keep checkpoints and stores here (default: a temporary folder, removed)")
    parser.add_argument(
        "--output", help="JSON path (default benchmarks/results/quality.json, --fast: quality_fast.json)"
    )
    parser.add_argument("--no-markdown", action="store_true", help="do not update benchmarks/RESULTS.md")
    parser.add_argument(
        "--only",
        choices=["gex-regime"],
        help="run one side study instead: gex-regime (GEX on models that fit their flipped labels, _gex_regime.py)",
    )
    parser.add_argument(
        "--render",
        metavar="JSON[,JSON...]",
        help="run nothing: redraw the plots and the RESULTS.md section from saved payloads "
        "(several: runs over disjoint seeds, merged)",
    )
    parser.add_argument(
        "--replace",
        metavar="JSON[,JSON...]",
        help="run nothing: the records of these payloads (e.g. a rerun of some methods) replace those of the saved "
        "quality.json with the same experiment, setting, method and seed; then redraw as --render does",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    if args.only == "gex-regime":
        from benchmarks.quality import _gex_regime

        seeds = [int(s) for s in _names(args.seeds)] if args.seeds else None
        return _gex_regime.main(
            fast=args.fast, seeds=seeds, settings=_names(args.settings), workdir=args.workdir,
            markdown_out=not args.no_markdown, render=args.render, methods=_names(args.methods),
        )  # fmt: skip

    from benchmarks._report import RESULTS_DIR, save_json, update_section
    from benchmarks.quality import run
    from benchmarks.quality._output import markdown, plots

    if args.replace:
        from benchmarks.quality._output import replace_records

        saved = json.loads((RESULTS_DIR / "quality.json").read_text())
        payload = replace_records(saved, [json.loads(Path(name).read_text()) for name in _names(args.replace)])
        path = save_json("quality", payload)
        written = plots(payload, path.parent)
        text = markdown(payload)
        if not args.no_markdown:
            update_section("quality", text)
        print(text + f"\n\nwrote {path}" + "".join(f", {p}" for p in written))
        return 0
    if args.render:
        from benchmarks.quality._output import merge

        loaded = [json.loads(Path(name).read_text()) for name in _names(args.render)]
        payload = loaded[0] if len(loaded) == 1 else merge(loaded)
        path = save_json("quality_fast" if payload["mode"] == "fast" else "quality", payload)
        written = plots(payload, path.parent)
        text = markdown(payload)
        if not args.no_markdown and payload["mode"] != "fast":
            update_section("quality", text)
        print(text + f"\n\nwrote {path}" + "".join(f", {p}" for p in written))
        return 0
    seeds = [int(s) for s in _names(args.seeds)] if args.seeds else None
    partial = (
        Path(args.output).with_suffix(".partial.json")
        if args.output
        else RESULTS_DIR / ("quality_fast.partial.json" if args.fast else "quality.partial.json")
    )

    def on_records(records, timings):
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"timings": timings, "records": records}, default=str))

    payload = run(
        fast=args.fast,
        seeds=seeds,
        experiments=_names(args.experiments),
        methods=_names(args.methods),
        settings=_names(args.settings),
        workdir=args.workdir,
        on_records=on_records,
    )
    partial.unlink(missing_ok=True)
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    else:
        path = save_json("quality_fast" if args.fast else "quality", payload)
    directory = path.parent
    written = plots(payload, directory)
    text = markdown(payload)
    print(text)
    if not args.no_markdown and not args.fast:
        update_section("quality", text)
    print(
        f"\nwrote {path}"
        + "".join(f", {p}" for p in written)
        + ("" if args.no_markdown or args.fast else ", benchmarks/RESULTS.md (section quality)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
