"""The ``gradindex`` command: thin click commands over the public library API."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

import gradindex
from gradindex import CheckpointSpec, GradIndexError

__all__ = ["main", "cli"]

FORMATS = ("table", "jsonl", "json", "csv", "parquet")


def _handle_errors(command):
    """User mistakes become one sentence on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (GradIndexError, ValueError) as error:
            if os.environ.get("GRADINDEX_DEBUG"):
                raise
            raise click.ClickException(str(error)) from error

    return wrapper


def _parse_checkpoint(ctx, param, values):
    specs = []
    for value in values:
        try:
            specs.append(CheckpointSpec.parse(value))
        except GradIndexError as error:
            raise click.BadParameter(str(error), ctx=ctx, param=param) from None
    return tuple(specs)


def _parse_shard(ctx, param, value):
    if value is None:
        return None
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r} must look like I/N, e.g. 0/4 for the first of 4 workers", ctx=ctx, param=param) from None
    if count <= 0 or not 0 <= index < count:
        raise click.BadParameter(f"{value!r} needs 0 <= I < N", ctx=ctx, param=param)
    return index, count


def _parse_bytes(ctx, param, value):
    if value is None:
        return None
    text = value.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if text[-1:] == "B":
            text = text[:-1]
        if text[-1:] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise click.BadParameter(f"{value!r} must be a size such as 512M or 4G", ctx=ctx, param=param) from None


def output_options(command):
    command = click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path), help="Write results to FILE instead of stdout.")(command)
    command = click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True, help="Output format (parquet needs -o).")(command)
    return command


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
        text = "\n".join(json.dumps(row) for row in rows) + ("\n" if rows else "") if fmt == "jsonl" else json.dumps(rows, indent=1) + "\n"
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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(gradindex.__version__, prog_name="gradindex")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug) to stderr.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def cli(ctx, verbose: int, quiet: bool) -> None:
    """gradindex: which training samples made the model predict this, and which look wrong.

    Build a store of per-sample gradient vectors once, then query it with FAISS.

    \b
    Example:
      gradindex demo
      gradindex build --task digits --checkpoint ckpt-10.pt:0.1 --checkpoint ckpt-20.pt:0.1 -o digits.gradindex
      gradindex query digits.gradindex --samples 0-4 -k 5
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.ensure_object(dict)
    ctx.obj["progress"] = False if quiet else None


@cli.command()
@click.option("--task", "task_spec", required=True, help="path/to/file.py:factory, package.module:factory, or a built-in name (digits, ...).")
@click.option("--checkpoint", "checkpoints", multiple=True, required=True, callback=_parse_checkpoint, help="PATH[:WEIGHT], repeatable; WEIGHT is the learning rate before it.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Where to write the store (a directory).")
@click.option("--method", default="tracin", show_default=True, type=click.Choice(list(gradindex.pipeline.METHODS)), help="How vectors are made.")
@click.option("--proj-dim", default=1024, show_default=True, type=click.IntRange(min=1), help="Projected dimension per checkpoint.")
@click.option("--projection", default="rademacher", show_default=True, type=click.Choice(["none", "rademacher", "gaussian", "sjlt"]), help="Random projection kind.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Projection seed.")
@click.option("--layers", multiple=True, help="Only parameters whose names match this glob (repeatable), e.g. 'fc2.*'.")
@click.option("--normalize", is_flag=True, help="Unit-normalise each checkpoint's vector (cosine scores).")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]), help="Stored vector dtype.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1), help="Samples per batch.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--rows-per-shard", type=click.IntRange(min=1), help="Rows per shard (default: about 64 MiB of vectors).")
@click.option("--shard", callback=_parse_shard, help="I/N: compute only this worker's shards (job arrays).")
@click.option("--resume", is_flag=True, help="Continue a stopped build of the same store.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.pass_context
@_handle_errors
def build(ctx, task_spec, checkpoints, output, method, proj_dim, projection, seed, layers, normalize, dtype, batch_size, device, rows_per_shard, shard, resume, overwrite):
    """Featurize the training set at each checkpoint and write a store.

    \b
    Example:
      gradindex build --task digits --checkpoint runs/ckpt-010.pt:0.1 \\
          --checkpoint runs/ckpt-020.pt:0.1 -o digits.gradindex --proj-dim 512
    """
    store = gradindex.build(
        task_spec, list(checkpoints), output, method=method, proj_dim=proj_dim, projection=projection, seed=seed,
        layers=tuple(layers) or None, normalize=normalize, dtype=dtype, batch_size=batch_size, device=device,
        rows_per_shard=rows_per_shard, shard=shard, resume=resume, overwrite=overwrite, progress=ctx.obj["progress"],
    )
    state = "complete" if store.complete else f"incomplete ({store.progress()})"
    click.echo(f"{store.path}: {store.n_samples} samples x {store.dim} ({store.dtype}), {state}", err=True)


@cli.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--task", "task_spec", help="Task SPEC (default: the one recorded in the store).")
@click.option("--split", default="test", show_default=True, help="Query split of the task.")
@click.option("--samples", help="Indices in the split: 0,3,10-19.")
@click.option("--all", "all_samples", is_flag=True, help="Query every sample of the split (the default when --samples is absent).")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(min=1), help="Results per query.")
@click.option("--opponents", is_flag=True, help="Most negative influence instead of most positive.")
@click.option("--checkpoint", "checkpoints", multiple=True, help="Checkpoint paths if they moved since the build (same files, same order).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--memory-budget", callback=_parse_bytes, help="Bytes in-memory search may use (e.g. 4G); larger stores are streamed.")
@click.option("--allow-incomplete", is_flag=True, help="Search the finished part of an incomplete store.")
@output_options
@click.pass_context
@_handle_errors
def query(ctx, store, task_spec, split, samples, all_samples, k, opponents, checkpoints, device, memory_budget, allow_incomplete, fmt, output):
    """The k most influential training samples for query samples.

    Rows: query, query_id, rank, row, sample_id, score (positive = proponent).

    \b
    Example:
      gradindex query digits.gradindex --samples 0-4 -k 5 --format jsonl
      gradindex query digits.gradindex --samples 7 --opponents
    """
    if samples and all_samples:
        raise click.UsageError("give --samples or --all, not both")
    table = gradindex.query(
        store, task_spec, split=split, samples=samples, k=k, opponents=opponents, checkpoints=list(checkpoints) or None,
        device=device, memory_budget=memory_budget, allow_incomplete=allow_incomplete, progress=ctx.obj["progress"],
    )
    _emit(table, fmt, output)


@cli.command("self-influence")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--top", type=click.IntRange(min=1), help="Only the N highest.")
@click.option("--allow-incomplete", is_flag=True, help="Rank the finished part of an incomplete store.")
@output_options
@_handle_errors
def self_influence(store, top, allow_incomplete, fmt, output):
    """Training samples ranked by self-influence (suspected mislabeled or atypical first).

    \b
    Example:
      gradindex self-influence digits.gradindex --top 20
    """
    _emit(gradindex.self_influence(store, top=top, allow_incomplete=allow_incomplete), fmt, output)


@cli.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@_handle_errors
def info(store, fmt):
    """Show a store's manifest and build progress.

    \b
    Example:
      gradindex info digits.gradindex --format json
    """
    details = gradindex.info(store)
    if fmt == "json":
        click.echo(json.dumps(details, indent=1, default=str))
        return
    fingerprint = details["fingerprint"]
    layout = details["layout"]
    lines = [
        f"store       {details['path']}",
        f"state       {details['state']} — {details['progress']}",
        f"vectors     {layout['n_samples']} x {layout['dim']} {layout['dtype']} ({layout['rows_per_shard']} rows per shard)",
        f"method      {json.dumps(fingerprint['method'])}",
        f"projection  {json.dumps(fingerprint['projection'])}",
        f"model       {fingerprint['model']['class']} ({len(fingerprint['params'])} parameter tensors indexed)",
        f"task        {json.dumps(details.get('task'))}",
    ]
    for position, ckpt in enumerate(details.get("checkpoints", [])):
        lines.append(f"checkpoint  [{position}] {ckpt['path']} weight={ckpt['weight']} sha256={fingerprint['checkpoints'][position]['sha256'][:12]}")
    click.echo("\n".join(lines))


@cli.command()
@click.argument("store", type=click.Path(path_type=Path))
@_handle_errors
def verify(store):
    """Re-hash every shard against its recorded checksum; exit 1 naming the bad ones.

    \b
    Example:
      gradindex verify digits.gradindex
    """
    problems = gradindex.verify(store)
    if problems:
        for problem in problems:
            click.echo(problem, err=True)
        raise click.ClickException(f"{len(problems)} problem(s) in {store}; rebuild the named shards with `gradindex build ... --resume --repair`")
    click.echo(f"{store}: every shard matches its checksum")


@cli.command()
@click.option("-o", "--output", "output_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("gradindex-demo"), show_default=True, help="Folder for checkpoints, store and results.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.pass_context
@_handle_errors
def demo(ctx, output_dir, seed):
    """The embedded default, end to end: digits with 10% flipped labels.

    Trains a small MLP with checkpoints, builds a TracIn-CP store, ranks training samples by
    self-influence (mislabeled-detection AUC against training-loss and random rankings) and
    shows the proponents and opponents of a few test digits.

    \b
    Example:
      gradindex demo -o /tmp/gradindex-demo
    """
    from gradindex.demo import run_demo

    run_demo(output_dir, seed=seed, progress=ctx.obj["progress"], echo=click.echo)


def main() -> None:
    cli(prog_name="gradindex")
