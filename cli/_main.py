"""The ``gradindex`` command: thin click commands over the public library API."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
from pathlib import Path

import click

import gradindex
from gradindex import BuildConfig, EnsembleConfig
from gradindex.apps import CURATE_BY, DEMOS
from gradindex.cli._options import (
    STORE,
    checkpoint_option,
    handle_errors,
    method_build_options,
    method_query_options,
    output_options,
    parse_bytes,
    parse_shard,
    server_options,
    setting_option,
    storage_options_option,
    summary_format_option,
    task_args_option,
)
from gradindex.pipeline import QueryConfig
from gradindex.search import IndexConfig

__all__ = ["cli", "main"]


def _emit(table, fmt: str, output: Path | None) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        if output is None:
            raise click.UsageError("--format parquet needs -o FILE")
        pq.write_table(table, output)
        click.echo(f"wrote {table.num_rows} rows to {output}", err=True)
        return
    if fmt == "csv":
        if output is not None:
            pacsv.write_csv(table, output)
            return
        import io

        sink = io.BytesIO()
        pacsv.write_csv(table, sink)
        click.echo(sink.getvalue().decode(), nl=False)
        return
    if fmt in ("jsonl", "json"):
        rows = table.to_pylist()
        text = (
            "\n".join(json.dumps(row) for row in rows) + ("\n" if rows else "")
            if fmt == "jsonl"
            else json.dumps(rows, indent=1) + "\n"
        )
    else:
        text = _format_table(table)
    if output is not None:
        output.write_text(text)
    else:
        click.echo(text, nl=False)


def _format_table(table) -> str:
    columns = table.column_names
    rows = table.to_pylist()

    def cell(value):
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value)

    cells = [[cell(row[name]) for name in columns] for row in rows]
    widths = [max([len(name)] + [len(line[position]) for line in cells]) for position, name in enumerate(columns)]
    lines = ["  ".join(name.rjust(width) for name, width in zip(columns, widths))]
    lines += ["  ".join(value.rjust(width) for value, width in zip(line, widths)) for line in cells]
    return "\n".join(lines) + "\n"


class _Command(click.Command):
    """A command that answers -h as well as --help in any context (click caches a command's help option
    when first built; a context made without the group as parent would otherwise fix it at --help)."""

    def get_help_option_names(self, ctx: click.Context) -> list[str]:
        return ["-h", "--help"]


class _Group(click.Group):
    """The ``gradindex`` group: -h/--help in any context, and its commands are ``_Command``s."""

    command_class = _Command

    def get_help_option_names(self, ctx: click.Context) -> list[str]:
        return ["-h", "--help"]


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(gradindex.__version__, prog_name="gradindex")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug) to stderr.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def cli(ctx, verbose: int, quiet: bool) -> None:
    """gradindex: which training samples made the model predict this, and which look wrong.

    Build a store of per-sample gradient vectors once, then query it with FAISS.

    Exit codes: 0 success, 1 error (one sentence on stderr naming the fix), 2 usage error.
    NO_COLOR is respected; progress bars go to stderr on a terminal only.

    \b
    Example:
      gradindex demo
      gradindex build --task digits --checkpoint ckpt-10.pt:0.1 --checkpoint ckpt-20.pt:0.1 -o digits.gradindex
      gradindex query digits.gradindex --samples 0-4 -k 5
    """
    if os.environ.get("NO_COLOR"):  # https://no-color.org: any non-empty value
        ctx.color = False
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.ensure_object(dict)
    ctx.obj["progress"] = False if quiet else None


@cli.command()
@click.option(
    "--task",
    "task",
    help="path/to/file.py:factory, package.module:factory, or a built-in name (digits, ...). "
    "Required unless --finalize.",
)
@task_args_option
@checkpoint_option
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=STORE,
    help="Where to write the store: a directory, or a URL such as s3://bucket/runs/a.gradindex.",
)
@setting_option(BuildConfig, "method")
@setting_option(BuildConfig, "proj_dim")
@setting_option(BuildConfig, "projection")
@setting_option(BuildConfig, "kron_sides")
@setting_option(BuildConfig, "seed")
@setting_option(BuildConfig, "layers", multiple=True, help="Only parameters whose names match this glob (repeatable).")
@setting_option(BuildConfig, "normalize")
@setting_option(BuildConfig, "dtype")
@setting_option(BuildConfig, "batch_size")
@setting_option(BuildConfig, "device")
@setting_option(BuildConfig, "featurize_memory", callback=parse_bytes, metavar="SIZE")
@setting_option(BuildConfig, "compile")
@setting_option(BuildConfig, "autocast")
@setting_option(BuildConfig, "rows_per_shard")
@click.option("--shard", callback=parse_shard, help="I/N: compute only this worker's shards (job arrays).")
@click.option("--resume", is_flag=True, help="Continue a stopped build of the same store.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.option(
    "--append",
    is_flag=True,
    help="Add the task's new training samples (after the store's rows) to a complete store; "
    "its indexes are updated or marked stale.",
)
@click.option(
    "--finalize",
    "finalize_only",
    is_flag=True,
    help="Only merge the workers' shard records into the manifest (-o STORE; no --task needed).",
)
@click.option(
    "--repair", is_flag=True, help="With --resume: first recompute exactly the shards `gradindex verify` finds damaged."
)
@setting_option(BuildConfig, "nonfinite")
@click.option(
    "--claim-timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Take over a shard another machine (sharing the file system or the object store) claimed this long ago "
    "without finishing it [default: 21600, or GRADINDEX_CLAIM_TIMEOUT].",
)
@storage_options_option
@method_build_options
@summary_format_option
@click.pass_context
@handle_errors
def build(
    ctx,
    task,
    task_options,
    checkpoints,
    output,
    shard,
    resume,
    overwrite,
    append,
    finalize_only,
    repair,
    claim_timeout,
    storage_options,
    summary_format,
    method_options,
    **config,
):
    """Featurize the training set at each checkpoint and write a store.

    Several workers can build one store: each takes --shard I/N (or torchrun's RANK/WORLD_SIZE);
    the one finishing the last shard completes the store, or run --finalize once all are done.

    \b
    Example:
      gradindex build --task digits --checkpoint runs/ckpt-010.pt:0.1 \\
          --checkpoint runs/ckpt-020.pt:0.1 -o digits.gradindex --proj-dim 512
      gradindex build --task digits --checkpoint runs/ckpt-010.pt:0.1 -o big.gradindex --shard 0/2
      gradindex build --finalize -o big.gradindex
      gradindex build --task digits --checkpoint runs/ckpt-010.pt:0.1 -o s3://my-bucket/digits.gradindex
      gradindex build --task digits --checkpoint runs/ckpt-010.pt:0.1 -o digits.gradindex --append
      gradindex build --task digits --checkpoint runs/ckpt-010.pt:0.1 -o digits.gradindex --resume --repair
      gradindex build --task breast-cancer --checkpoint final.pt -o bc-if.gradindex \\
          --method if --solver cg --damping 0.01
      gradindex build --task digits --checkpoint final.pt -o arnoldi.gradindex --method arnoldi --rank 50
      gradindex build --task digits --checkpoint final.pt -o ekfac.gradindex --precondition ekfac --damping 0.1
      gradindex build --task digits --checkpoint 'runs/seed-*/final.pt' -o trak.gradindex --method trak --proj-dim 512
      gradindex build --task digits --checkpoint final.pt --checkpoint ge/member-001.pt ... \\
          -o gex.gradindex --method gex
      gradindex build --task hf-causal-lm --task-arg model=runs/gpt2 --task-arg train=train.jsonl \\
          --checkpoint runs/gpt2/checkpoint-10:0.1 -o lm.gradindex
    """
    if finalize_only:
        if task or task_options or checkpoints or resume or overwrite or append or shard or repair:
            raise click.UsageError("--finalize takes only -o STORE: it merges what the workers wrote")
        store = gradindex.finalize(output, storage_options=storage_options)
    else:
        if not task or not checkpoints:
            raise click.UsageError("build needs --task and at least one --checkpoint (or --finalize -o STORE)")
        if repair and resume and gradindex.store.store_path(output, storage_options).exists():
            bad = gradindex.open_store(output, storage_options=storage_options).bad_shards()
            click.echo(
                f"repair: recomputing shard(s) {bad} of {output}"
                if bad
                else f"repair: every finished shard of {output} matches its checksum",
                err=True,
            )
        given = {name: value for name, value in config.items() if value is not None}  # None: the setting's default
        given["layers"] = tuple(config["layers"]) or None
        store = gradindex.build(
            task,
            list(checkpoints),
            output,
            BuildConfig(method_options=method_options, **given),
            shard=shard,
            resume=resume,
            overwrite=overwrite,
            progress=ctx.obj["progress"],
            append=append,
            repair=repair,
            storage_options=storage_options,
            claim_timeout=claim_timeout,
            task_options=task_options,
        )
    state = "complete" if store.complete else f"incomplete ({store.progress()})"
    nonfinite_rows = store.nonfinite_rows(allow_incomplete=True)
    for kind, rows in nonfinite_rows.items():
        if rows and summary_format != "json":
            shown = ", ".join(map(str, rows[:20])) + (" ..." if len(rows) > 20 else "")
            click.echo(
                f"{len(rows)} row(s) had NaN/inf vectors and were {kind} (zero vectors, listed in the manifest): "
                f"{shown}",
                err=True,
            )
    if summary_format == "json":
        click.echo(
            json.dumps(
                {
                    "store": str(store.path),
                    "n_samples": store.n_samples,
                    "dim": store.dim,
                    "dtype": store.dtype,
                    "complete": store.complete,
                    "progress": store.progress(),
                    "nonfinite": nonfinite_rows,
                }
            )
        )
        return
    click.echo(f"{store.path}: {store.n_samples} samples x {store.dim} ({store.dtype}), {state}", err=True)


def _session_options(command):
    """The options of how a store is loaded for queries, shared by ``query`` and ``serve``: the task (and its
    arguments), checkpoints that moved, device, memory budget, incomplete stores, a persisted index, Dask, and the
    storage options of a store URL."""
    options = [
        click.option("--task", "task", help="Task SPEC (default: the one recorded in the store)."),
        task_args_option,
        click.option(
            "--checkpoint",
            "checkpoints",
            multiple=True,
            help="Checkpoint paths if they moved since the build (same files, same order).",
        ),
        setting_option(QueryConfig, "device"),
        setting_option(QueryConfig, "memory_budget", callback=parse_bytes),
        setting_option(QueryConfig, "allow_incomplete"),
        setting_option(QueryConfig, "index"),
        setting_option(QueryConfig, "dask"),
        storage_options_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.argument("store", type=STORE, required=False)
@setting_option(QueryConfig, "split")
@click.option("--samples", help="Indices in the split: 0,3,10-19.")
@click.option(
    "--all", "all_samples", is_flag=True, help="Query every sample of the split (the default when --samples is absent)."
)
@setting_option(QueryConfig, "k", "-k")
@setting_option(QueryConfig, "opponents")
@setting_option(QueryConfig, "nprobe")
@_session_options
@method_query_options
@server_options
@output_options
@click.pass_context
@handle_errors
def query(
    ctx,
    store,
    task,
    task_options,
    samples,
    all_samples,
    checkpoints,
    storage_options,
    fmt,
    output,
    method_options,
    server,
    token,
    **config,
):
    """The k most influential training samples for query samples.

    Rows: query, query_id, rank, row, sample_id, score (positive = proponent).

    \b
    Example:
      gradindex query digits.gradindex --samples 0-4 -k 5 --format jsonl
      gradindex query digits.gradindex --samples 7 --opponents
      gradindex query big.gradindex --samples 0-99 --index ivf4096-sqfp16 --nprobe 64
      gradindex query big.gradindex --samples 0-99 --dask local:4
      gradindex query big.gradindex --samples 0-99 --index ivf4096-sqfp16 --dask tcp://scheduler:8786
      gradindex query bc-if.gradindex --samples 0-4 --damping 0.1 --solver lissa
      gradindex query lm.gradindex --task-arg test=more_prompts.jsonl --samples 0-9
      gradindex query --server grpc://127.0.0.1:8815 --samples 0-4 -k 5
    """
    if samples and all_samples:
        raise click.UsageError("give --samples or --all, not both")
    if server is not None:
        _refuse_with_server(
            ctx, "task", "task_options", "checkpoints", "storage_options", *_SERVER_SETTINGS, "allow_incomplete"
        )
        with gradindex.connect(server, token=token) as client:
            table = client.query(
                samples,
                split=config["split"],
                k=config["k"],
                opponents=config["opponents"],
                nprobe=config["nprobe"],
                method_options=method_options,
                store=store,
            )
        _emit(table, fmt, output)
        return
    _require_store(store, token)
    table = gradindex.query(
        store,
        task,
        samples=samples,
        checkpoints=list(checkpoints) or None,
        progress=ctx.obj["progress"],
        method_options=method_options,
        storage_options=storage_options,
        task_options=task_options,
        **config,
    )
    _emit(table, fmt, output)


@cli.command("self-influence")
@click.argument("store", type=STORE, required=False)
@click.option("--top", type=click.IntRange(min=1), help="Only the N highest.")
@click.option("--allow-incomplete", is_flag=True, help="Rank the finished part of an incomplete store.")
@click.option("--task", "task", help="With --damping/--solver on an if store: task SPEC (default: the store's).")
@task_args_option
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    help="With --damping/--solver on an if store: checkpoint paths if they moved.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto, cpu or cuda[:N] (if stores recomputed at another damping).",
)
@storage_options_option
@method_query_options
@server_options
@output_options
@click.pass_context
@handle_errors
def self_influence(
    ctx,
    store,
    top,
    allow_incomplete,
    task,
    task_options,
    checkpoints,
    device,
    storage_options,
    fmt,
    output,
    method_options,
    server,
    token,
):
    """Training samples ranked by self-influence (suspected mislabeled or atypical first).

    For if and trak stores the score is ⟨T φ(z), φ(z)⟩ at the store's damping; --damping / --solver
    recompute it (trak from the store alone; if through the task's gradients).

    \b
    Example:
      gradindex self-influence digits.gradindex --top 20
      gradindex self-influence trak.gradindex --top 20 --damping 0.1
      gradindex self-influence --server grpc://127.0.0.1:8815 --top 20
    """
    if server is not None:
        _refuse_with_server(ctx, "allow_incomplete", "task", "task_options", "checkpoints", "device", "storage_options")
        with gradindex.connect(server, token=token) as client:
            table = client.self_influence(top=top, method_options=method_options, store=store)
        _emit(table, fmt, output)
        return
    _require_store(store, token)
    table = gradindex.self_influence(
        store,
        top=top,
        allow_incomplete=allow_incomplete,
        method_options=method_options,
        task=task,
        checkpoints=list(checkpoints) or None,
        device=device,
        progress=ctx.obj["progress"],
        storage_options=storage_options,
        task_options=task_options,
    )
    _emit(table, fmt, output)


# what a server is started with, not asked per request
_SERVER_SETTINGS = ("device", "memory_budget", "index", "dask")


def _refuse_with_server(ctx: click.Context, *names: str) -> None:
    """A usage error for each option given with --server that belongs to the server (set by `gradindex serve`)."""
    from click.core import ParameterSource

    for param in ctx.command.params:
        if param.name in names and ctx.get_parameter_source(param.name) not in (None, ParameterSource.DEFAULT):
            flag = max(param.opts, key=len)
            raise click.UsageError(
                f"{flag} is the server's setting: give it to `gradindex serve`, or query without --server"
            )


def _require_store(store: str | None, token: str | None) -> None:
    if store is None:
        raise click.UsageError("Missing argument 'STORE' (or ask a server with --server URL).")
    if token is not None:
        raise click.UsageError("--token goes with --server URL")


@cli.command()
@click.argument("store", type=STORE)
@_session_options
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; anything but loopback needs --token.",
)
@click.option(
    "--port", default=8815, show_default=True, type=click.IntRange(0, 65535), help="Port; 0 picks a free one."
)
@click.option(
    "--token",
    help="A secret every request must carry (clients: --token or GRADINDEX_TOKEN) [default: GRADINDEX_TOKEN]; "
    "required off loopback.",
)
@handle_errors
def serve(store, task, task_options, checkpoints, host, port, token, storage_options, **config):
    """Keep a store loaded and answer queries over Arrow Flight until stopped.

    Loads the task, checkpoints, featurizer and vectors once (or the persisted --index, or Dask
    actors holding the shards with --dask) and answers query, opponents and self-influence
    requests from `gradindex query --server URL`, `gradindex self-influence --server URL` and
    gradindex.connect(URL), each with exactly the rows of the direct call. The first line on
    stdout is the URL. A store that changes (--append) is reloaded before the next answer.
    SIGTERM or Ctrl-C stops it after the request in flight.

    \b
    Example:
      gradindex serve digits.gradindex --port 0
      gradindex query --server grpc://127.0.0.1:8815 --samples 0-4 -k 5
      GRADINDEX_TOKEN=secret gradindex serve big.gradindex --host 0.0.0.0 --index ivf4096-sqfp16
    """

    stdout = sys.stdout  # the URL's alone: what the task's code prints while loading or answering goes to stderr

    def ready(server) -> None:
        click.echo(server.url, file=stdout)
        stdout.flush()
        details = server.info()
        click.echo(
            f"serving {details['store']} ({details['n_samples']} rows x {details['dim']}, {details['search']}); "
            "stop with Ctrl-C or SIGTERM",
            err=True,
        )

    with contextlib.redirect_stdout(sys.stderr):
        gradindex.serve(
            store,
            task,
            ready=ready,
            task_options=task_options,
            checkpoints=list(checkpoints) or None,
            storage_options=storage_options,
            host=host,
            port=port,
            token=token,
            **config,
        )


@cli.command()
@click.argument("store", type=STORE)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@storage_options_option
@handle_errors
def info(store, fmt, storage_options):
    """Show a store's manifest, build progress and, for kron, which path each parameter took and why.

    \b
    Example:
      gradindex info digits.gradindex --format json
      gradindex info s3://my-bucket/digits.gradindex --storage-option endpoint_url=http://localhost:9000
    """
    details = gradindex.info(store, storage_options=storage_options)
    if fmt == "json":
        click.echo(json.dumps(details, indent=1, default=str))
        return
    click.echo("\n".join(_info_lines(details)))


def _info_lines(details: dict) -> list[str]:
    """The text of ``gradindex info``: every field read with a fallback, so a store whose manifest lacks one (made by
    another version, or edited) is still shown."""

    def field(tree: object, *keys: object, default: object = "?") -> object:
        for key in keys:
            try:
                tree = tree[key]  # type: ignore[index]
            except (KeyError, IndexError, TypeError):
                return default
        return tree

    fingerprint, layout = details.get("fingerprint") or {}, details.get("layout") or {}
    params = field(fingerprint, "params", default=[])
    lines = [
        f"store       {details.get('path')}",
        f"state       {details.get('state')} — {details.get('progress')}",
        f"vectors     {field(layout, 'n_samples')} x {field(layout, 'dim')} {field(layout, 'dtype')} "
        f"({field(layout, 'rows_per_shard')} rows per shard)",
        f"method      {json.dumps(field(fingerprint, 'method'), default=str)}",
        f"projection  {json.dumps(_without_plan(field(fingerprint, 'projection')), default=str)}",
        f"model       {field(fingerprint, 'model', 'class')} "
        f"({len(params) if isinstance(params, list) else '?'} parameter tensors indexed)",
        f"task        {json.dumps(details.get('task'), default=str)}",
    ]
    for row in details.get("projection_plan") or []:  # kron: which path each parameter took, and why
        lines.append(f"kron        {row['param']}: {row['path']}, {row['type']}, {row['projection']} — {row['why']}")
    for position, ckpt in enumerate(details.get("checkpoints") or []):
        sha = str(field(fingerprint, "checkpoints", position, "sha256"))[:12]
        lines.append(f"checkpoint  [{position}] {field(ckpt, 'path')} weight={field(ckpt, 'weight')} sha256={sha}")
    for meta in details.get("indexes") or []:
        lines.append(f"index       {_index_line(meta)}")
    if details.get("dataset_sha256"):
        lines.append(
            f"dataset     {field(layout, 'n_samples')} samples, content sha256={details['dataset_sha256'][:12]}"
        )
    for kind, rows in (details.get("nonfinite") or {}).items():
        if rows:
            lines.append(
                f"nonfinite   {len(rows)} row(s) {kind}: "
                f"{', '.join(map(str, rows[:20]))}{' ...' if len(rows) > 20 else ''}"
            )
    return lines


def _without_plan(projection: object) -> object:
    """The projection spec without a kron plan that the ``kron`` lines list parameter by parameter."""
    if isinstance(projection, dict) and isinstance(projection.get("plan"), list):
        return {key: value for key, value in projection.items() if key != "plan"}
    return projection


def _index_line(meta: dict) -> str:
    if "error" in meta:
        return f"{meta['name']}: {meta['error']}"

    def knob(key: str) -> str:
        return f" at {meta['search_parameter']}={meta.get(key)}" if meta.get("search_parameter") else ""

    where = ", on disk" if meta.get("on_disk") else ""
    stale = f" — STALE: {meta['stale']}" if meta.get("stale") else ""
    if isinstance(meta.get("recall_opponents"), (int, float)):
        opponents = f", {meta['recall_opponents']:.3f}{knob('nprobe_opponents')} for opponents"
    else:
        opponents = ", opponents not measured (built by an older version; rebuild with --overwrite)"
    return (
        f"{meta['name']}: {meta['factory_resolved']} ({meta['ntotal']} rows{where}), "
        f"recall@{meta['k']}={meta['recall']:.3f}{knob('nprobe')} for proponents{opponents} "
        f"on {meta['recall_queries']} held-out rows{stale}"
    )


@cli.command("index")
@click.argument("store", type=STORE)
@setting_option(IndexConfig, "factory", required=False, help_suffix=" Required unless --list.")
@click.option("--list", "list_only", is_flag=True, help="List the store's persisted indexes instead of building one.")
@setting_option(IndexConfig, "name")
@setting_option(IndexConfig, "k", "-k")
@setting_option(IndexConfig, "recall_queries")
@setting_option(IndexConfig, "target_recall")
@setting_option(IndexConfig, "train_size")
@setting_option(IndexConfig, "on_disk")
@click.option(
    "--gpu/--cpu",
    "use_gpu",
    default=None,
    help="Train and search IVF on all GPUs (default: when faiss has GPUs) or on CPU.",
)
@setting_option(IndexConfig, "memory_budget", callback=parse_bytes)
@setting_option(IndexConfig, "overwrite")
@setting_option(IndexConfig, "seed")
@setting_option(IndexConfig, "dask")
@storage_options_option
@summary_format_option
@click.pass_context
@handle_errors
def index(ctx, store, list_only, storage_options, summary_format, **config):
    """Build an approximate index of a store and measure its recall against exact search.

    Trains once on a sample drawn across the store's shards, adds it shard by shard (with --dask,
    in parallel on the workers), and stores the index under the store's indexes/ with its
    recall@k for proponents and for opponents, each direction with its own nprobe (shown by
    gradindex info); query it with --index NAME (with --dask too: the lists spread over the
    workers). --list lists the indexes a store has, with their recall and whether they are stale.

    \b
    Example:
      gradindex index big.gradindex --factory "IVF4096,SQfp16"
      gradindex index big.gradindex --factory "IVF,SQfp16" --dask tcp://scheduler:8786
      gradindex index big.gradindex --factory "IVF,PQ64" --name pq --on-disk
      gradindex index big.gradindex --factory HNSW32 --target-recall 0.99
      gradindex index big.gradindex --list
      gradindex query big.gradindex --samples 0-9 --index ivf4096-sqfp16
    """
    if list_only:
        if config["factory"] is not None:
            raise click.UsageError("give --factory FACTORY to build an index or --list to list them, not both")
        metas = gradindex.list_indexes(gradindex.open_store(store, storage_options=storage_options))
        if summary_format == "json":
            click.echo(json.dumps(metas))
        elif metas:
            click.echo("\n".join(_index_line(meta) for meta in metas))
        else:
            click.echo(f"{store} has no persisted indexes; build one with --factory", err=True)
        return
    if config["factory"] is None:
        raise click.UsageError("give --factory FACTORY (e.g. IVF4096,SQfp16) to build an index, or --list")
    meta = gradindex.build_index(
        gradindex.open_store(store, storage_options=storage_options), progress=ctx.obj["progress"], **config
    )
    if summary_format == "json":
        click.echo(json.dumps(meta))
        return
    for direction, key in (("proponents", "curve"), ("opponents", "curve_opponents")):
        for point in meta.get(key) or []:
            knob = f"{meta['search_parameter']}={point['value']}: " if meta.get("search_parameter") else ""
            click.echo(
                f"  {direction} {knob}recall@{meta['k']}={point['recall']:.3f}, {point['queries_per_s']:.0f} queries/s",
                err=True,
            )
    click.echo(f"index {_index_line(meta)}", err=True)


@cli.command()
@click.argument("store", type=STORE)
@storage_options_option
@summary_format_option
@handle_errors
def verify(store, storage_options, summary_format):
    """Re-hash every shard against its recorded checksum; exit 1 naming the bad ones.

    \b
    Example:
      gradindex verify digits.gradindex
      gradindex verify digits.gradindex --format json
    """
    problems = gradindex.verify(gradindex.open_store(store, storage_options=storage_options))
    if summary_format == "json":
        click.echo(json.dumps({"store": str(store), "ok": not problems, "problems": problems}))
        if problems:
            raise SystemExit(1)
        return
    if problems:
        for problem in problems:
            click.echo(problem, err=True)
        raise click.ClickException(
            f"{len(problems)} problem(s) in {store}; rebuild the named shards with `gradindex build ... --resume "
            "--repair`"
        )
    click.echo(f"{store}: every shard matches its checksum")


@cli.command()
@click.argument("name", required=False, default="digits", type=click.Choice(list(DEMOS)), metavar="[NAME]")
@click.option(
    "-o",
    "--output",
    "output_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for checkpoints, store and results [default: gradindex-demo, gradindex-demo-gpt2 for gpt2].",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.pass_context
@handle_errors
def demo(ctx, name, output_dir, seed):
    """The embedded default, end to end: digits with 10% flipped labels.

    Trains an MLP until it memorises its flipped labels (5 checkpoints), builds a TracIn-CP
    store over them, ranks training samples by self-influence (mislabeled-detection AUC beside
    the final training loss and a random ranking) and shows the proponents and opponents of a
    few test digits from a unit-normalized (cosine) store.

    NAME picks another demo: gpt2 trains a tiny GPT-2 on procedural text with 10% corrupted
    (shuffled or noise) sentences, builds its store through the hf-causal-lm task with
    --task-arg options (the command is printed), ranks the corrupted sentences by self-influence
    and shows proponents and opponents as decoded text (needs pip install "gradindex[hf]").

    \b
    Example:
      gradindex demo -o /tmp/gradindex-demo
      gradindex demo gpt2 -o /tmp/gradindex-demo-gpt2
    """
    from gradindex.apps import run_demo, run_gpt2_demo

    if name == "gpt2":
        folder = output_dir or Path("gradindex-demo-gpt2")
        run_gpt2_demo(folder, seed=seed, progress=ctx.obj["progress"], echo=click.echo)
    else:
        run_demo(output_dir or Path("gradindex-demo"), seed=seed, progress=ctx.obj["progress"], echo=click.echo)


@cli.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--task",
    "task",
    help="Task SPEC (default: the one recorded in the store); needed for pictures, predictions and queries.",
)
@task_args_option
@click.option(
    "--queries",
    help="Indices in --split whose proponents and opponents are shown: 0,3,10-12 [default: 0-2; 'none' for none].",
)
@click.option("--split", default="test", show_default=True, help="Split the --queries come from.")
@click.option(
    "-k",
    "k",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Proponents and opponents shown per query.",
)
@click.option(
    "--top", default=24, show_default=True, type=click.IntRange(min=1), help="Highest self-influence samples shown."
)
@click.option(
    "--results",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Quality figures (JSON) [default: results.json beside the store, if any].",
)
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    help="Checkpoint paths if they moved since the build (same files, same order).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option(
    "-o",
    "--output",
    default=Path("report.html"),
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The HTML file to write.",
)
@summary_format_option
@click.pass_context
@handle_errors
def report(
    ctx, store, task, task_options, queries, split, k, top, results, checkpoints, device, output, summary_format
):
    """Write one self-contained HTML page to look at a store in a browser.

    The self-influence histogram, the top suspected mislabeled samples (thumbnails for images,
    sparklines for signals, text for tokens) with given vs predicted labels, the proponents and
    opponents of chosen queries, quality figures and the manifest. Nothing is fetched when viewing.

    \b
    Example:
      gradindex report digits.gradindex --queries 0-4 -o report.html
      gradindex report digits.gradindex --task digits --top 48 --queries none --format json
    """
    summary = gradindex.report(
        store,
        task,
        output=output,
        queries=queries,
        split=split,
        k=k,
        top=top,
        results=results,
        checkpoints=list(checkpoints) or None,
        device=device,
        progress=ctx.obj["progress"],
        task_options=task_options,
    )
    if summary_format == "json":
        click.echo(json.dumps(summary))
        return
    for note in summary["notes"]:
        click.echo(f"note: {note}", err=True)
    click.echo(
        f"wrote {summary['output']} ({summary['bytes'] / 1024:.0f} KiB): {len(summary['suspects'])} suspects, "
        f"{len(summary['queries'])} queries, {summary['pictures']} pictures; open it in a browser",
        err=True,
    )


def _write_table(table, output: Path) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    suffix = output.suffix.lower()
    if suffix == ".parquet":
        pq.write_table(table, output)
    elif suffix == ".csv":
        pacsv.write_csv(table, output)
    elif suffix in (".jsonl", ".json"):
        rows = table.to_pylist()
        text = (
            "".join(json.dumps(row) + "\n" for row in rows) if suffix == ".jsonl" else json.dumps(rows, indent=1) + "\n"
        )
        output.write_text(text)
    else:
        raise click.UsageError(f"-o {output}: give a .parquet, .csv, .jsonl or .json file name")


@cli.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--drop-top", help="Drop the N (e.g. 50) or P% (e.g. 5%) highest-scoring samples --by self-influence.")
@click.option(
    "--by",
    default="self-influence",
    show_default=True,
    type=click.Choice(list(CURATE_BY)),
    help="Score that --drop-top ranks by.",
)
@click.option(
    "--for-queries",
    is_flag=True,
    help="Keep the training samples most helpful for target queries (LESS-style summed influence); with --select.",
)
@click.option(
    "--select", help="Keep the N or P% training samples with the highest summed influence on the --samples of --split."
)
@click.option("--task", "task", help="Task SPEC for --select (default: the one recorded in the store).")
@task_args_option
@click.option("--split", default="test", show_default=True, help="Split of the target queries (--select).")
@click.option("--samples", help="Target queries in --split: 0,3,10-19 [default: the whole split] (--select).")
@click.option(
    "--checkpoint", "checkpoints", multiple=True, help="Checkpoint paths if they moved since the build (--select)."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--memory-budget", callback=parse_bytes, help="Bytes in-memory search may use (e.g. 4G) (--select).")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Table row, sample_id, label, score, rank, keep: .parquet, .csv, .jsonl or .json.",
)
@summary_format_option
@click.pass_context
@handle_errors
def curate(
    ctx,
    store,
    drop_top,
    by,
    for_queries,
    select,
    task,
    task_options,
    split,
    samples,
    checkpoints,
    device,
    memory_budget,
    output,
    summary_format,
):
    """Choose training samples to keep: a kept/dropped table to join on sample_id.

    --drop-top drops the most suspicious samples (highest self-influence). --for-queries --select
    keeps the training samples with the highest summed influence on a set of target queries
    (LESS-style data selection). Every training sample gets one row; keep is true or false.

    \b
    Example:
      gradindex curate digits.gradindex --drop-top 5% -o keep.parquet
      gradindex curate digits.gradindex --drop-top 50 --by self-influence -o keep.csv --format json
      gradindex curate digits.gradindex --for-queries --split test --samples 0-99 --select 10% -o helpful.parquet
    """
    if drop_top is not None and (select is not None or for_queries):
        raise click.UsageError("--drop-top and --for-queries/--select choose in different ways; give one of them")
    if for_queries and select is None:
        raise click.UsageError("--for-queries needs --select N or --select P% (how many training samples to keep)")
    if drop_top is None and select is None:
        raise click.UsageError(
            "give --drop-top N|P% (drop the most suspicious) or --for-queries --select N|P% (keep the most helpful)"
        )
    if drop_top is not None and (samples is not None or task is not None or task_options or checkpoints):
        raise click.UsageError(
            "--samples, --task, --task-arg and --checkpoint pick target queries for --select; --drop-top needs none "
            "of them"
        )
    if output.suffix.lower() not in (".parquet", ".csv", ".jsonl", ".json"):
        raise click.UsageError(f"-o {output}: give a .parquet, .csv, .jsonl or .json file name")
    table = gradindex.curate(
        store,
        drop_top=drop_top,
        by=by,
        select=select,
        task=task,
        split=split,
        samples=samples,
        checkpoints=list(checkpoints) or None,
        device=device,
        memory_budget=memory_budget,
        progress=ctx.obj["progress"],
        task_options=task_options,
    )
    _write_table(table, output)
    from gradindex.apps.curation import summary as curate_summary

    summary = {"output": str(output), "n_samples": table.num_rows, **curate_summary(table)}
    if summary_format == "json":
        click.echo(json.dumps(summary))
        return
    click.echo(
        f"wrote {output}: keep {summary['kept']}, drop {summary['dropped']} of {table.num_rows} samples "
        f"({summary['mode']} {summary['amount']})",
        err=True,
    )


@cli.command()
@click.option("--task", "task", required=True, help="Task SPEC, as for build.")
@task_args_option
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(path_type=Path),
    help="The trained checkpoint θ* to ensemble around (a file, or a save_pretrained folder).",
)
@setting_option(EnsembleConfig, "members", required=True, default=None, show_default=False)
@setting_option(EnsembleConfig, "steps", default=None, show_default=False, help_suffix=" (required unless --laplace)")
@setting_option(EnsembleConfig, "lr", default=None, show_default=False, help_suffix=" (required unless --laplace)")
@setting_option(EnsembleConfig, "lr_min")
@setting_option(EnsembleConfig, "schedule")
@setting_option(EnsembleConfig, "momentum")
@setting_option(EnsembleConfig, "weight_decay")
@setting_option(EnsembleConfig, "batch_size")
@setting_option(EnsembleConfig, "seed")
@setting_option(EnsembleConfig, "laplace")
@setting_option(EnsembleConfig, "prior_precision")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for member-001.pt, ... and ensemble.json.",
)
@click.option("--overwrite", is_flag=True, help="Replace an ensemble already in the folder.")
@summary_format_option
@click.pass_context
@handle_errors
def ensemble(ctx, task, task_options, checkpoint, device, output, overwrite, summary_format, **config):
    """Make a fast geometric ensemble around a trained checkpoint (for --method gex, or tracin over members).

    Fine-tunes from the checkpoint for M learning-rate cycles of S steps (the task's train_step, or
    SGD on its loss) and saves one member per cycle; then prints the build commands that use them.
    The default weight decay (auto) moves the members out of the checkpoint's basin, so that a model
    which fits its labels gets members that forget what it memorised; members that stay within 10%
    of the checkpoint's weights get a warning. Kim et al.'s recipe: 8-32 members, 800 steps, lr 0.05.
    With --laplace the members are drawn from a K-FAC Laplace posterior around the checkpoint instead (GEX's
    la_kfac: no fine-tuning, no --steps or --lr).

    \b
    Example:
      gradindex ensemble --task digits --checkpoint runs/ckpt-030.pt --members 8 --steps 800 --lr 0.05 -o runs/ge
      gradindex build --task digits --method gex --checkpoint runs/ckpt-030.pt \\
          --checkpoint runs/ge/member-001.pt ... --checkpoint runs/ge/member-008.pt -o gex.gradindex
      gradindex ensemble --task digits --checkpoint runs/ckpt-030.pt --members 8 --laplace -o runs/la
    """
    if not config.get("laplace") and (config.get("steps") is None or config.get("lr") is None):
        raise click.UsageError(
            "a geometric ensemble needs --steps and --lr (or pass --laplace for K-FAC Laplace members)"
        )
    made = gradindex.make_ensemble(
        gradindex.load_task(task, **task_options),
        checkpoint,
        output,
        EnsembleConfig(**{name: value for name, value in config.items() if value is not None}),
        overwrite=overwrite,
        device=device,
        progress=ctx.obj["progress"],
    )
    if summary_format == "json":
        click.echo(
            json.dumps(
                {
                    "base": str(made.base),
                    "members": [str(path) for path in made.members],
                    "gex_checkpoints": made.gex_checkpoints(),
                    "tracin_checkpoints": made.tracin_checkpoints(),
                    "weight_decay": None if made.config.laplace else made.config.decay,
                    "distances": list(made.distances),
                }
            )
        )
        return
    how = "K-FAC Laplace draws" if made.config.laplace else f"weight decay {made.config.decay:.3g}"
    click.echo(
        f"wrote {len(made.members)} members to {output} ({how}; relative distance from "
        f"the checkpoint {min(made.distances):.2g}-{max(made.distances):.2g})",
        err=True,
    )
    task_args = "".join(f" --task-arg {shlex.quote(f'{key}={value}')}" for key, value in task_options.items())
    gex = " ".join(f"--checkpoint {spec}" for spec in made.gex_checkpoints())
    tracin = " ".join(f"--checkpoint {spec}" for spec in made.tracin_checkpoints())
    click.echo(f"gradindex build --task {task}{task_args} --method gex {gex} -o gex.gradindex")
    click.echo(f"gradindex build --task {task}{task_args} --method tracin {tracin} -o ensemble-tracin.gradindex")


def main() -> None:
    cli(prog_name="gradindex")
