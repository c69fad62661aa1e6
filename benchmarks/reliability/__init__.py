"""The long reliability sweep (issue 6): the fault-injection suite of ``tests/reliability`` with many
more points, on the local disk (the tests use tmpfs when there is one).

    python -m benchmarks.reliability            # about 40 minutes on 2 busy cores
    python -m benchmarks.reliability --quick    # a few minutes, to check the script

Runs the same harness as the tests (``tests/reliability/harness.py``): kill -9 at random moments and
at every named crash point (first, middle and last shard) of a 20k-row build, every disk step failed
with four errnos and with a disk that stays full, three rounds of 8 workers with 4 polling readers plus
the raw-zarr control, the corruption matrix with 8 bit-flips and 8 zero-fills per file of a complete
store, a store being built and a persisted index, and the hypothesis state machine with 60 examples; then the
hostile-world sweeps (issue 14): the crafted-store matrix (path traversal, symlinks, oversized shapes, wrong dtypes,
truncated and swapped files; nothing outside the store touched), appends killed at every step and at random moments,
failing at every disk step, over a changed history, read while they run, overwrites of what is not a store, and the
mistake matrix of the command line (one sentence, no traceback).
Writes ``benchmarks/results/reliability.json`` and the ``reliability`` section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._report import machine, markdown_table, save_json, update_section

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from reliability import appends, crafted, harness, mistakes, rel_tasks  # noqa: E402

# every named crash point, at the first, a middle and the last shard of the 20-shard build
SWEEP_SITES = (
    "create-before-rename",
    *(f"shard-before-rename:{n}" for n in (1, 7, 14, 20)),
    *(f"shard-after-features:{n}" for n in (1, 10, 20)),
    *(f"shard-before-record:{n}" for n in (1, 13, 20)),
    *(f"shard-after-record:{n}" for n in (1, 5, 19, 20)),
    "finalize-before-manifest",
    "finalize-after-manifest",
    "finalize-cleanup",
)


def _line(name: str, figures: dict, order: list[str]) -> str:
    return harness.summary(name, figures, order)


def run(quick: bool, workdir: Path) -> dict:
    import torch

    import gradindex

    torch.set_num_threads(1)
    results: dict = {}
    (workdir / "ckpt").mkdir(parents=True)
    checkpoints = rel_tasks.save_checkpoints(workdir / "ckpt", count=1)

    # 1. kill -9 sweep ------------------------------------------------------------------------
    spec, options = harness.BIG, harness.BIG_OPTIONS
    sites = harness.BUILD_SITES if quick else SWEEP_SITES
    started = time.perf_counter()
    reference = gradindex.build(spec, checkpoints, workdir / "kill-reference.gradindex", **options)
    (workdir / "kill").mkdir()
    kill = harness.kill_sweep(
        workdir / "kill",
        spec,
        checkpoints,
        options,
        harness.snapshot(reference.path),
        n_random=8 if quick else 32,
        sites=sites,
        seed=6,
        rows_per_shard=options["rows_per_shard"],
    )
    kill["rows"] = reference.n_samples
    kill["shards"] = reference.n_shards
    kill["seconds"] = round(time.perf_counter() - started, 1)
    results["kill"] = kill
    print(
        _line("kill sweep", kill["figures"], ["tried", "killed", "resumed", "rows lost", "mismatches", "orphans"]),
        flush=True,
    )

    # 2. I/O errors ------------------------------------------------------------------------------
    started = time.perf_counter()
    (workdir / "io").mkdir()
    io_spec, io_options = harness.IO, harness.IO_OPTIONS
    io_reference = gradindex.build(io_spec, checkpoints, workdir / "io-reference.gradindex", **io_options)
    codes = (errno.EIO, errno.ENOSPC) if quick else (errno.EIO, errno.ENOSPC, errno.EROFS, errno.EDQUOT)
    io = harness.io_error_sweep(
        workdir / "io", io_spec, checkpoints, io_options, harness.snapshot(io_reference.path), codes=codes
    )
    (workdir / "io-sticky").mkdir()
    sticky = harness.io_error_sweep(
        workdir / "io-sticky",
        io_spec,
        checkpoints,
        io_options,
        harness.snapshot(io_reference.path),
        codes=(errno.ENOSPC,),
        every=1 if not quick else 5,
        sticky=True,
    )
    io["sticky"] = sticky
    io["codes"] = [errno.errorcode[code] for code in codes]
    io["seconds"] = round(time.perf_counter() - started, 1)
    results["io"] = io
    print(
        _line(
            "I/O errors",
            io["figures"],
            [
                "injected",
                "typed errors",
                "completed anyway",
                "untyped errors",
                "reopened",
                "resumed",
                "mismatches",
                "orphans",
            ],
        ),
        flush=True,
    )
    print(
        _line(
            "I/O errors, disk stays full",
            sticky["figures"],
            ["injected", "typed errors", "completed anyway", "reopened", "resumed", "mismatches", "orphans"],
        ),
        flush=True,
    )

    # 3. concurrency -----------------------------------------------------------------------------
    started = time.perf_counter()
    rounds = []
    for number in range(1 if quick else 3):
        folder = workdir / f"concurrency-{number}"
        folder.mkdir()
        outcome = harness.concurrency_run(
            folder, spec, checkpoints, options, reference.path, n_workers=4 if quick else 8, n_readers=2 if quick else 4
        )
        rounds.append(outcome)
        print(
            _line(
                f"concurrency round {number}",
                outcome["figures"],
                [
                    "workers ok",
                    "completed by a worker",
                    "polls",
                    "shard reads",
                    "saw complete",
                    "complete too early",
                    "wrong shards seen",
                    "read errors",
                    "misaligned rejected",
                    "intruder rejected",
                    "mismatches",
                    "orphans",
                ],
            ),
            flush=True,
        )
        shutil.rmtree(folder, ignore_errors=True)
    controls = []
    for number in range(1 if quick else 3):
        folder = workdir / f"control-{number}"
        folder.mkdir()
        controls.append(harness.raw_zarr_control(folder))
        print(f"raw-zarr control {number}: {controls[-1]}", flush=True)
    results["concurrency"] = {
        "rounds": rounds,
        "controls": controls,
        "seconds": round(time.perf_counter() - started, 1),
    }

    # 4. corruption matrix -----------------------------------------------------------------------
    started = time.perf_counter()
    small = gradindex.build(harness.SMALL, checkpoints, workdir / "corrupt-pristine.gradindex", **harness.SMALL_OPTIONS)
    queries = np.random.default_rng(3).standard_normal((5, small.dim)).astype(np.float32)

    def repair(path):
        return gradindex.build(harness.SMALL, checkpoints, path, resume=True, repair=True, **harness.SMALL_OPTIONS)

    flips = 2 if quick else 8
    (workdir / "corrupt-complete").mkdir()
    complete = harness.corruption_matrix(
        small.path, workdir / "corrupt-complete", queries, 10, flips_per_file=flips, seed=11, repair=repair
    )
    incomplete_path = workdir / "corrupt-incomplete.gradindex"
    code, _ = harness.run_child(
        harness.child_build,
        harness.SMALL,
        checkpoints,
        str(incomplete_path),
        harness.SMALL_OPTIONS,
        "shard-after-record:3",
    )
    assert code == 137, code
    (workdir / "corrupt-incomplete").mkdir()
    incomplete = harness.corruption_matrix(
        incomplete_path,
        workdir / "corrupt-incomplete",
        queries,
        10,
        flips_per_file=flips,
        seed=12,
        repair=repair,
        repaired_bytes=harness.snapshot(small.path),
    )
    indexed = workdir / "corrupt-index.gradindex"
    shutil.copytree(small.path, indexed)
    gradindex.build_index(indexed, "IVF4,Flat", name="ivf", progress=False)
    (workdir / "corrupt-index").mkdir()
    index = harness.corruption_matrix(
        indexed,
        workdir / "corrupt-index",
        queries,
        10,
        flips_per_file=flips * 2,
        seed=13,
        index_name="ivf",
        select=lambda name: name.startswith("indexes/"),
    )
    results["corruption"] = {
        "complete": complete,
        "incomplete": incomplete,
        "index": index,
        "seconds": round(time.perf_counter() - started, 1),
    }
    order = [
        "mutations",
        "clean error",
        "record lost",
        "harmless",
        "crash",
        "silently wrong",
        "repair tried",
        "repaired",
    ]
    for name, matrix in (("complete store", complete), ("store being built", incomplete), ("persisted index", index)):
        print(_line(f"corruption matrix, {name}", matrix["figures"], order), flush=True)

    # 5. the state machine ---------------------------------------------------------------------
    started = time.perf_counter()
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test
    from reliability import test_stateful

    test_stateful.FIGURES.clear()
    run_state_machine_as_test(
        test_stateful.StoreMachine,
        settings=settings(
            max_examples=10 if quick else 60,
            stateful_step_count=15 if quick else 25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    results["stateful"] = {"figures": dict(test_stateful.FIGURES), "seconds": round(time.perf_counter() - started, 1)}
    print(
        _line(
            "stateful store machine",
            results["stateful"]["figures"],
            [
                "examples",
                "write steps",
                "writers killed",
                "resume steps",
                "reopen steps",
                "finalize steps",
                "completed",
                "corrupt steps",
                "shards repaired",
                "searches checked against brute force",
            ],
        ),
        flush=True,
    )
    # 6. the crafted-store matrix -------------------------------------------------------------------
    started = time.perf_counter()
    crafted_small = gradindex.build(
        harness.SMALL, checkpoints, workdir / "crafted-pristine.gradindex", **harness.SMALL_OPTIONS
    ).path
    results["crafted"] = crafted.sweep(workdir / "crafted", crafted_small)
    results["crafted"]["seconds"] = round(time.perf_counter() - started, 1)
    print(
        _line(
            "crafted stores",
            results["crafted"]["figures"],
            [
                "cases",
                "cases refused",
                "cases harmless",
                "cases crash",
                "victims touched",
                "children died",
                "operations",
                "operations error",
                "operations ok",
                "operations crash",
                "operations wrong",
            ],
        ),
        flush=True,
    )

    # 7. appends --------------------------------------------------------------------------------------
    started = time.perf_counter()
    append_kill = appends.append_kill_sweep(workdir / "append-kill", checkpoints, n_random=4 if quick else 16, seed=8)
    append_io = appends.append_io_error_sweep(
        workdir / "append-io",
        checkpoints,
        codes=(errno.EIO,) if quick else (errno.EIO, errno.ENOSPC),
        every=5 if quick else 1,
    )
    results["append"] = {
        "kill": append_kill,
        "io": append_io,
        "history": appends.history_refusals(workdir / "append-history", checkpoints),
        "readers": appends.append_reader_run(workdir / "append-readers", checkpoints, n_readers=2 if quick else 4),
        "overwrite": appends.overwrite_refusals(workdir / "overwrite", checkpoints),
    }
    results["append"]["seconds"] = round(time.perf_counter() - started, 1)
    for name, part in results["append"].items():
        if isinstance(part, dict):
            print(_line(f"append: {name}", part.get("figures", {}), sorted(part.get("figures", {}))), flush=True)

    # 8. the mistake matrix ---------------------------------------------------------------------------
    started = time.perf_counter()
    figures, failures = mistakes.run(mistakes.make_world(workdir / "mistakes"))
    results["mistakes"] = {"figures": figures, "failures": failures, "seconds": round(time.perf_counter() - started, 1)}
    print(_line("mistake matrix", figures, ["mistakes", "answered in one sentence", "tracebacks"]), flush=True)
    harness.stop_children()
    return results


def _markdown(results: dict, command: str, info: dict, seconds: float) -> str:
    kill, io = results["kill"], results["io"]
    lines = [
        "## Reliability: fault-injection sweep (issue 6)",
        "",
        f"`{command}` on {info['cores']} cores ({info['cpu']}), {info['memory_gib']} GiB, torch {info['torch']}, "
        f"faiss {info['faiss']}, "
        f"{info['date']}; {seconds / 60:.1f} min; load average at the end {info.get('load')} (the machine was shared). "
        "Stores on the local disk (ext4). The CI-sized version of each part runs in `tests/reliability` (`python -m "
        "pytest tests/reliability`).",
        "",
        "| part | what was done | figures |",
        "|---|---|---|",
    ]
    fig = kill["figures"]
    lines.append(
        f"| kill -9 | {kill['rows']:,}-row build ({kill['shards']} shards) killed at {fig.get('tried', 0)} points: "
        "random SIGKILLs and "
        f"every named crash point; each reopened and resumed in another process | tried {fig.get('tried', 0)}, killed "
        f"{fig.get('killed', 0)}, "
        f"resumed {fig.get('resumed', 0)}, rows lost {fig.get('rows lost', 0)}, byte mismatches vs an uninterrupted "
        "build "
        f"{fig.get('mismatches', 0)}, orphan temp files {fig.get('orphans', 0)}; failures {len(kill['failures'])} |"
    )
    fig = io["figures"]
    failing = fig.get("injected", 0) - fig.get("completed anyway", 0)
    lines.append(
        f"| I/O errors | each of the {io['steps']} disk steps of a build failed with {', '.join(io['codes'])} | "
        f"injected {fig.get('injected', 0)}, "
        f"clean typed errors {fig.get('typed errors', 0)}/{failing} (+{fig.get('completed anyway', 0)} in best-effort "
        "cleanup, store complete), "
        f"untyped {fig.get('untyped errors', 0)}, reopen {fig.get('reopened', 0)}/{fig.get('injected', 0)}, resume "
        f"{fig.get('resumed', 0)}/{fig.get('injected', 0)}, "
        f"mismatches {fig.get('mismatches', 0)}, orphans {fig.get('orphans', 0)} |"
    )
    fig = io["sticky"]["figures"]
    lines.append(
        "| disk stays full | ENOSPC from step N on, for every N, then resume on a fixed disk | injected "
        f"{fig.get('injected', 0)}, typed errors "
        f"{fig.get('typed errors', 0)} (+{fig.get('completed anyway', 0)} completed), resume "
        f"{fig.get('resumed', 0)}/{fig.get('injected', 0)}, "
        f"mismatches {fig.get('mismatches', 0)}, orphans {fig.get('orphans', 0)} |"
    )
    for number, outcome in enumerate(results["concurrency"]["rounds"]):
        fig = outcome["figures"]
        lines.append(
            f"| concurrency, round {number + 1} | {fig.get('workers ok', 0)} worker processes on disjoint shards, "
            "readers polling | "
            f"polls {fig.get('polls', 0)}, shard reads {fig.get('shard reads', 0)}, complete too early "
            f"{fig.get('complete too early', 0)}, "
            f"wrong shards seen {fig.get('wrong shards seen', 0)}, misaligned worker rejected "
            f"{fig.get('misaligned rejected', 0)}/1, "
            f"intruder rejected {fig.get('intruder rejected', 0)}/1, mismatches {fig.get('mismatches', 0)}, orphans "
            f"{fig.get('orphans', 0)} |"
        )
    for number, control in enumerate(results["concurrency"]["controls"]):
        lines.append(
            f"| control {number + 1}: raw zarr, shared shard | 2 plain-zarr writers, disjoint rows of one shard | "
            "rows lost "
            f"{control['lost']:,} of {control['rows']:,}, exit codes {control['exit codes']} |"
        )
    for name, key in (
        ("complete store", "complete"),
        ("store being built", "incomplete"),
        ("persisted index (IVF4,Flat)", "index"),
    ):
        matrix = results["corruption"][key]
        fig = matrix["figures"]
        repair = (
            f", repaired byte-identical {fig.get('repaired', 0)}/{fig.get('repair tried', 0)}"
            if fig.get("repair tried")
            else ""
        )
        lines.append(
            f"| corruption, {name} | truncate, bit-flip, zero-fill, delete each file | mutations "
            f"{fig.get('mutations', 0)}, clean errors "
            f"{fig.get('clean error', 0)}, record lost {fig.get('record lost', 0)}, harmless "
            f"{fig.get('harmless', 0)}, crashes {fig.get('crash', 0)}, "
            f"silently wrong answers {fig.get('silently wrong', 0)}{repair} |"
        )
    fig = results["stateful"]["figures"]
    lines.append(
        "| state machine | hypothesis: write, kill, resume, reopen, finalize, corrupt, repair, search | examples "
        f"{fig.get('examples', 0)}, "
        f"writers killed {fig.get('writers killed', 0)}, completions {fig.get('completed', 0)}, shards repaired "
        f"{fig.get('shards repaired', 0)}, "
        f"searches checked against numpy brute force {fig.get('searches checked against brute force', 0)}, failures 0 |"
    )
    fig = results["crafted"]["figures"]
    kinds = ", ".join(
        f"{kind} {counts.get('cases', 0)}" for kind, counts in sorted(results["crafted"]["by_kind"].items())
    )
    lines.append(
        f"| crafted stores | {fig.get('cases', 0)} stores with their checksums recomputed as an attacker would "
        f"({kinds}), each put through {fig.get('operations', 0) // max(1, fig.get('cases', 1))} operations of the API "
        "and the CLI "
        f"| refused {fig.get('cases refused', 0)}, harmless {fig.get('cases harmless', 0)}, crashes "
        f"{fig.get('cases crash', 0)}, files outside the store touched {fig.get('victims touched', 0)}, children "
        f"died {fig.get('children died', 0)}, wrong answers {fig.get('operations wrong', 0)} of "
        f"{fig.get('operations', 0)} operations |"
    )
    append = results["append"]
    fig = append["kill"]["figures"]
    lines.append(
        f"| append killed | an append (1,050 -> 1,300 rows) stopped at every crash point and by random SIGKILLs | "
        f"tried {fig.get('tried', 0)}, complete after {fig.get('complete', 0)}, answering as before "
        f"{fig.get('queries as before', 0)} (as grown, after the swap, {fig.get('queries as grown', 0)}), "
        f"byte-identical after the sweep {fig.get('byte-identical after the sweep', 0)}, reruns equal a fresh build "
        f"{fig.get('reruns equal a fresh build', 0)}, orphans {fig.get('orphans', 0)}, failures "
        f"{len(append['kill'].get('failures', []))} |"
    )
    fig = append["io"]["figures"]
    lines.append(
        f"| append, disk errors | every disk step of an append failed | injected {fig.get('injected', 0)}, typed "
        f"errors {fig.get('typed errors', 0)} (+{fig.get('completed anyway', 0)} completed), byte-identical after the "
        f"sweep {fig.get('byte-identical after the sweep', 0)}, reruns equal "
        f"{fig.get('reruns equal a fresh build', 0)} |"
    )
    fig = append["history"]["figures"]
    lines.append(
        f"| append, changed history | a changed, a reordered sample, changed ids, ids of another type | tried "
        f"{fig.get('tried', 0)}, refused naming the row {fig.get('refused, naming the row', 0)}, store byte-identical "
        f"{fig.get('byte-identical', 0)} |"
    )
    fig = append["readers"]["figures"]
    lines.append(
        f"| append, readers | processes polling the store while an append runs | polls {fig.get('polls', 0)}, errors "
        f"{fig.get('errors', 0)}, wrong answers {fig.get('wrong answers', 0)}, stores opened before still right "
        f"{fig.get('held readers answering as before', 0)}/{fig.get('held readers', 0)} |"
    )
    fig = append["overwrite"]["figures"]
    lines.append(
        f"| overwrite | over a file, a folder, links, a foreign Zarr group (local and memory://) | refused and intact "
        f"{fig.get('left intact', 0)}/{fig.get('tried', 0)}, real stores replaced {fig.get('stores replaced', 0)}/"
        f"{fig.get('stores tried', 0)} |"
    )
    fig = results["mistakes"]["figures"]
    lines.append(
        f"| mistake matrix | what a careless user types at the command line | mistakes {fig['mistakes']}, answered in "
        f"one sentence {fig['answered in one sentence']}, tracebacks {fig['tracebacks']} |"
    )
    lines += [
        "",
        "Repairs that do not come back: a damaged manifest (`zarr.json`) holds the checksums, so it needs "
        "`--overwrite`. "
        '"Record lost": a deleted shard record of a store being built makes it declare that shard unfinished; its '
        "answers are "
        "then exactly those over the shards it declares, and a resume redoes the shard. An index's meta is sealed and "
        "its files carry sha256 checksums checked before faiss reads them.",
        "",
        "By kind of file (corruption, complete store):",
        "",
        markdown_table(
            [{"file": kind, **counts} for kind, counts in sorted(results["corruption"]["complete"]["by_kind"].items())],
            ["file", "clean error", "harmless", "crash", "silently wrong", "repaired"],
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="CI-sized points, to check the script (nothing is recorded)"
    )
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary folder on the local disk)")
    args = parser.parse_args()
    command = "python -m benchmarks.reliability" + (" --quick" if args.quick else "")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gi-reliability-sweep-"))
    started = time.perf_counter()
    try:
        results = run(args.quick, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.perf_counter() - started
    info = machine() | {"load": ", ".join(f"{value:.1f}" for value in os.getloadavg())}
    payload = {"command": command, "machine": info, "seconds": round(seconds, 1), "results": results}
    if not args.quick:
        print(f"wrote {save_json('reliability', payload)}")
        update_section("reliability", _markdown(results, command, info, seconds))
        print("updated benchmarks/RESULTS.md (section reliability)")
    else:  # a check of the script: nothing recorded
        print(_markdown(results, command, info, seconds))
    failures = results["kill"]["failures"] + results["io"]["failures"] + results["io"]["sticky"]["failures"]
    bad = failures or any(
        matrix["figures"].get("crash")
        for matrix in results["corruption"].values()
        if isinstance(matrix, dict) and "figures" in matrix
    )
    if bad:
        print(json.dumps(failures[:20], indent=1))
        raise SystemExit(1)
