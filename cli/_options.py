"""Options the commands share, built from the library's settings (``setting_option``, ``method_options``) rather than
typed again: their flags, types, choices, defaults and help come from the settings dataclasses and METHOD_OPTIONS.

Also the error handling every command shares: a library error becomes one sentence on stderr, with the Python argument
names it uses written as this command's flags.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any

import click

import gradindex
from gradindex import ArgumentError, GradIndexError
from gradindex.errors import with_flags
from gradindex.methods import METHOD_OPTIONS
from gradindex.utils import Setting, setting_of

__all__ = [
    "FORMATS",
    "STORE",
    "checkpoint_option",
    "handle_errors",
    "method_build_options",
    "method_query_options",
    "output_options",
    "parse_bytes",
    "parse_shard",
    "server_options",
    "setting_option",
    "storage_options_option",
    "summary_format_option",
    "task_arg_value",
    "task_args_option",
]

FORMATS = ("table", "jsonl", "json", "csv", "parquet")
# a store is a local folder or an fsspec URL: kept as typed (a Path would fold s3://b into s3:/b)
STORE = click.Path(path_type=str)


# ---- errors ---------------------------------------------------------------------------------------------------------


def _flags_of(command: click.Command | None) -> dict[str, str]:
    """Python argument name -> the flag that sets it: this command's own first, then any other command's."""
    flags: dict[str, str] = {}
    root = click.get_current_context(silent=True)
    group = root.find_root().command if root is not None else None
    commands = list(getattr(group, "commands", {}).values()) if isinstance(group, click.Group) else []
    for each in [*commands, command]:
        for param in getattr(each, "params", []):
            longest = max((opt for opt in param.opts if opt.startswith("-")), key=len, default=None)
            if longest and param.name:
                flags[param.name] = longest
                flags[param.name.rstrip("_")] = longest  # compile_ is Python's compile
    flags.update({"task": "--task", "checkpoints": "--checkpoint", "method_options": "--method-option"})
    flags.update({"storage_options": "--storage-option", "output": "-o", "k": "-k"})
    return flags


def handle_errors(command):
    """User mistakes become one sentence on stderr and exit 1, never a traceback (GRADINDEX_DEBUG=1 shows it).

    Library errors name Python arguments (``proj_dim=4``, ``top must be ...``); here they are said with the flags."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as error:
            if os.environ.get("GRADINDEX_DEBUG"):
                raise
            raise click.ClickException(_one_sentence(error)) from error

    return wrapper


def _one_sentence(error: Exception) -> str:
    """What the user sees of an error: ours and ValueErrors as they are (with flags for Python names), a file system's
    refusal with its path, and anything else as the bug it is, with how to see its traceback."""
    if isinstance(error, (GradIndexError, ValueError)):
        context = click.get_current_context(silent=True)
        flags = _flags_of(context.command if context is not None else None)
        subject = error.argument if isinstance(error, ArgumentError) else None
        return with_flags(" ".join(str(error).split()), flags, subject)
    if isinstance(error, OSError):
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror or error}{where}; check the path, its permissions and the free space"
    text = " ".join(str(error).split())[:300]
    return (
        f"unexpected {type(error).__name__}: {text}; this is a gradindex bug: run again with GRADINDEX_DEBUG=1 to "
        "see the traceback, and report it"
    )


# ---- options from settings -----------------------------------------------------------------------------------------


def parse_bytes(ctx, param, value):
    """``512M``, ``4G``, ``1.5T`` or a number of bytes."""
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


def _help(accepts: Setting, default: Any, *, describe_choices: bool = True) -> str:
    text = accepts.help[:1].upper() + accepts.help[1:]
    if describe_choices and isinstance(accepts.choices, dict):
        text += ": " + "; ".join(f"{choice}: {meaning}" for choice, meaning in accepts.choices.items())
    text += "."
    if accepts.default_text is not None:
        text += f" [default: {accepts.default_text}]"
    return text


def _click_type(accepts: Setting) -> Any:
    if accepts.choices is not None:
        return click.Choice(list(accepts.choices))
    low = accepts.minimum if accepts.minimum is not None else accepts.above
    high = accepts.maximum if accepts.maximum is not None else accepts.below
    if accepts.integer:
        if low is not None and accepts.minimum is None:
            low += 1  # above: an exclusive bound
        return click.IntRange(min=None if low is None else int(low))
    if low is not None or high is not None:
        return click.FloatRange(
            min=low, max=high, min_open=accepts.minimum is None and low is not None,
            max_open=accepts.maximum is None and high is not None,
        )  # fmt: skip
    return None


def setting_option(config: type, name: str, *decls: str, help_suffix: str = "", **overrides: Any):
    """The click option of the setting ``name`` of a settings dataclass: its flag (``--proj-dim`` for proj_dim unless
    ``decls`` say otherwise), type, choices, default and help (then ``help_suffix``), all from the setting;
    ``overrides`` go to click."""
    item, accepts = setting_of(config, name)
    default = None if item.default is dataclasses.MISSING else item.default
    options: dict[str, Any] = {"help": _help(accepts, default) + help_suffix}
    if accepts.flag:
        options.update(is_flag=True, default=bool(default))
    else:
        options["type"] = _click_type(accepts)
        if default is not None and accepts.default_text is None:
            options.update(default=default, show_default=True)
        if accepts.metavar:
            options["metavar"] = accepts.metavar
    if item.default is dataclasses.MISSING:
        options["required"] = True
    options.update(overrides)
    if options.get("callback") is parse_bytes:
        options["type"] = str
    return click.option(*(decls or (f"--{name.replace('_', '-')}",)), name, **options)


# ---- method options ------------------------------------------------------------------------------------------------


def _parse_method_option(ctx, param, values):
    options = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{value!r} must look like KEY=VALUE, e.g. cg_tol=1e-8", ctx=ctx, param=param)
        options[key.strip().replace("-", "_")] = text.strip()
    return options


def _method_option_flag(name: str, query_time: bool):
    """One method option as a flag: help, type and choices from METHOD_OPTIONS, with the methods that take it and their
    defaults (``--damping``: if 0.001, arnoldi 0, trak auto)."""
    owners = {method: specs[name] for method, specs in METHOD_OPTIONS.items() if name in specs}
    if query_time:
        owners = {method: spec for method, spec in owners.items() if spec.query_time}
    first = next(iter(owners.values()))
    helps = dict.fromkeys(spec.help for spec in owners.values())
    text = f"{' / '.join(owners)}: " + "; ".join(helps)
    if query_time:
        text += " (for this query; default: the store's)"
    else:
        defaults = ", ".join(
            f"{method} {spec.accepts.default_text if spec.default is None else spec.default}"
            for method, spec in owners.items()
        )
        text += f" [default: {defaults}]"
    if first.accepts.flag:  # --name / --no-name, None when neither is given (the method's default)
        flag = name.replace("_", "-")
        return click.option(f"--{flag}/--no-{flag}", name, default=None, help=text[:1].upper() + text[1:])
    return click.option(
        f"--{name.replace('_', '-')}", name, type=_click_type(first.accepts), help=text[:1].upper() + text[1:]
    )


_METHOD_OPTION = click.option(
    "--method-option",
    "method_option",
    multiple=True,
    callback=_parse_method_option,
    metavar="KEY=VALUE",
    help="Any other method option, repeatable (e.g. cg_tol=1e-8, iterations=60, out_to_loss=false, hvp_batch_size=64).",
)
# the method options offered as flags of their own (every option is also reachable through --method-option)
_BUILD_FLAGS = (
    "precondition",
    "precondition_side",
    "precondition_mix",
    "adam_normalize",
    "tau",
    "rank",
    "solver",
    "damping",
    "hessian",
    "lissa_depth",
    "lissa_scale",
    "lissa_repeats",
)
_QUERY_FLAGS = ("damping", "solver")


def _gathered(names, command):
    """Wrap ``command`` so the options ``names`` arrive as one ``method_options`` dict (``None`` = not given)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        options = dict(kwargs.pop("method_option", None) or {})
        for name in names:
            value = kwargs.pop(name, None)
            if value is not None:
                options[name] = value
        return command(*args, method_options=options, **kwargs)

    return wrapper


def method_build_options(command):
    """The options of --method tracin (--precondition) / gex / if / arnoldi / trak, gathered into ``method_options``."""
    command = _gathered(_BUILD_FLAGS, command)
    for option in reversed([*(_method_option_flag(name, False) for name in _BUILD_FLAGS), _METHOD_OPTION]):
        command = option(command)
    return command


def method_query_options(command):
    """The query-side options of asymmetric stores: --damping, --solver, --method-option."""
    command = _gathered(_QUERY_FLAGS, command)
    for option in reversed([*(_method_option_flag(name, True) for name in _QUERY_FLAGS), _METHOD_OPTION]):
        command = option(command)
    return command


# ---- task options --------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def task_arg_value(text: str) -> Any:
    """A ``--task-arg`` value as the factory gets it: ``true``/``false`` as booleans, ``12`` as an int, ``0.1`` or
    ``1e-3`` as a float, anything else as the string it is."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if _NUMBER.fullmatch(text):
        try:
            return int(text)
        except ValueError:
            return float(text)
    return text


def _parse_task_args(ctx, param, values):
    options: dict[str, Any] = {}
    for value in values:
        key, sep, text = value.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise click.BadParameter(
                f"{value!r} must look like KEY=VALUE, e.g. flip_fraction=0.1 or model=runs/gpt2", ctx=ctx, param=param
            )
        if not key.isidentifier():
            raise click.BadParameter(
                f"{key!r} is not a keyword the task factory can take; name one of its arguments", ctx=ctx, param=param
            )
        if key in options:
            raise click.BadParameter(f"{key} is given twice; give each task option once", ctx=ctx, param=param)
        options[key] = task_arg_value(text.strip())
    return options


def task_args_option(command):
    """``--task-arg KEY=VALUE`` (repeatable): keyword arguments of the task factory, gathered in ``task_options``."""
    return click.option(
        "--task-arg",
        "task_options",
        multiple=True,
        metavar="KEY=VALUE",
        callback=_parse_task_args,
        help="A keyword argument of the task factory, repeatable (e.g. flip_fraction=0.1, model=runs/gpt2, "
        "train=train.jsonl); numbers and true/false are typed. A build records them beside --task; later commands "
        "without --task reuse them, updated by any given.",
    )(command)


# ---- the rest ------------------------------------------------------------------------------------------------------


def _parse_checkpoint(ctx, param, values):
    from gradindex import CheckpointSpec  # loads torch: only when a command is given checkpoints

    specs = []
    for value in values:
        try:
            spec = CheckpointSpec.parse(value)
        except GradIndexError as error:
            raise click.BadParameter(str(error), ctx=ctx, param=param) from None
        specs += _expanded(spec, ctx, param)
    return tuple(specs)


def _expanded(spec, ctx, param) -> list:
    """A quoted glob (``'runs/seed-*/final.pt'``: the final checkpoints of independently trained runs, TRAK's models)
    as one spec per match, in sorted order, each with the pattern's weight; any other path as it is."""
    import glob

    if Path(spec.path).exists() or not glob.has_magic(spec.path):
        return [spec]
    matches = sorted(glob.glob(spec.path))
    if not matches:
        raise click.BadParameter(
            f"no checkpoint matches {spec.path!r}; check the pattern (quote it so the shell leaves it to gradindex)",
            ctx=ctx,
            param=param,
        )
    return [type(spec)(path=match, weight=spec.weight) for match in matches]


def checkpoint_option(command):
    """``--checkpoint PATH[:WEIGHT]``, repeatable, parsed into CheckpointSpecs."""
    return click.option(
        "--checkpoint",
        "checkpoints",
        multiple=True,
        callback=_parse_checkpoint,
        help="PATH[:WEIGHT], repeatable; WEIGHT is the learning rate before it. A quoted glob ('runs/seed-*/final.pt') "
        "gives every match, sorted. Required unless --finalize.",
    )(command)


def parse_shard(ctx, param, value):
    if value is None:
        return None
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} must look like I/N, e.g. 0/4 for the first of 4 workers", ctx=ctx, param=param
        ) from None
    if count <= 0 or not 0 <= index < count:
        raise click.BadParameter(f"{value!r} needs 0 <= I < N", ctx=ctx, param=param)
    return index, count


def output_options(command):
    command = click.option(
        "-o",
        "--output",
        "output",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Write results to FILE instead of stdout.",
    )(command)
    command = click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default="table",
        show_default=True,
        help="Output format (parquet needs -o).",
    )(command)
    return command


def summary_format_option(command):
    """``--format text|json`` for commands whose output is a summary (json: one object on stdout, for scripts)."""
    return click.option(
        "--format",
        "summary_format",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="Summary as text, or as one JSON object on stdout.",
    )(command)


def _parse_storage_options(ctx, param, values):
    try:
        return gradindex.store.parse_storage_options(values) or None
    except GradIndexError as error:
        raise click.BadParameter(str(error)) from None


def storage_options_option(command):
    """``--storage-option KEY=VALUE`` (repeatable): options of the fsspec filesystem of a store URL."""
    return click.option(
        "--storage-option",
        "storage_options",
        multiple=True,
        metavar="KEY=VALUE",
        callback=_parse_storage_options,
        help="For a store URL (s3://, gs://, ...): an fsspec storage option, repeatable, "
        "e.g. endpoint_url=http://localhost:9000 (credentials and endpoint otherwise come from the environment, "
        "e.g. AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL).",
    )(command)


def server_options(command):
    """``--server URL`` and ``--token``: ask a running ``gradindex serve`` instead of loading the store here."""
    command = click.option(
        "--token", help="With --server: the server's token [default: the GRADINDEX_TOKEN environment variable]."
    )(command)
    return click.option(
        "--server",
        "server",
        metavar="URL",
        help="Ask the `gradindex serve` server at URL (grpc://host:port) instead of loading the store here: the same "
        "rows, without loading torch; STORE may be left out.",
    )(command)
