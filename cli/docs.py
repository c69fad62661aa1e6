"""The command-line reference, generated from the click commands themselves so it cannot drift.

    python -m gradindex.cli.docs -o docs/cli.md        # regenerate the committed reference
    python -m gradindex.cli.docs --check docs/cli.md   # exit 1 (and say how to fix) when it is stale

``tests/test_docs.py`` runs the check, so a new option without a regenerated reference fails the suite.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import textwrap
from pathlib import Path

import click

from ._main import cli

__all__ = ["main", "render"]

REGENERATE = "python -m gradindex.cli.docs -o docs/cli.md"


def _help_markdown(text: str) -> list[str]:
    """A click docstring as markdown: ``\\b`` paragraphs (examples) become code blocks, the rest stays prose."""
    out: list[str] = []
    for paragraph in inspect.cleandoc(text or "").split("\n\n"):
        lines = paragraph.splitlines()
        if not lines:
            continue
        if lines[0].strip() == "\b":
            lines = lines[1:]
            if lines and lines[0].rstrip().endswith(":") and all(line.startswith(" ") for line in lines[1:]):
                out += [f"**{lines[0].strip()}**", "", "```console"]
                body = textwrap.dedent("\n".join(lines[1:])).strip("\n")
                previous = ""
                for line in body.splitlines():  # a prompt on each command, none on its continuation lines
                    out.append(line if not line or line.startswith(" ") or previous.endswith("\\") else f"$ {line}")
                    previous = line
                out += ["```", ""]
            else:
                out += ["```", *lines, "```", ""]
        else:
            out += [" ".join(line.strip() for line in lines), ""]
    return out


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _option_names(text: str) -> str:
    """An option's flags and metavar for a table cell: choices as ``[a, b]`` (a ``|`` inside code would end the cell
    in some Markdown renderers and show its escape in others)."""
    return text.replace("|", ", ").replace("\n", " ")


def _command_section(command: click.Command, ctx: click.Context, heading: str) -> list[str]:
    out = [f"{heading} `{ctx.command_path}`", ""]
    out += ["```text", command.get_usage(ctx).strip(), "```", ""]
    out += _help_markdown(command.help or "")
    # options only: click >= 8.5 gives arguments a help record too, and they are listed above
    records = [
        (param, param.get_help_record(ctx)) for param in command.get_params(ctx) if isinstance(param, click.Option)
    ]
    arguments = [param for param in command.get_params(ctx) if isinstance(param, click.Argument)]
    if arguments:
        out += ["Arguments: " + ", ".join(f"`{param.human_readable_name}`" for param in arguments), ""]
    options = [record for param, record in records if record is not None]
    if options:
        out += ["| option | description |", "|---|---|"]
        out += [f"| `{_option_names(names)}` | {_escape(description)} |" for names, description in options]
        out.append("")
    return out


def render() -> str:
    """The whole reference as markdown: the group, then every command in click's order."""
    root = click.Context(cli, info_name="gradindex")
    lines = [
        "# gradindex command-line reference",
        "",
        f"<!-- generated from the click commands by `{REGENERATE}`; do not edit by hand -->",
        "",
        "Commands: " + ", ".join(f"[`{name}`](#gradindex-{name})" for name in cli.list_commands(root)),
        "",
    ]
    lines += _command_section(cli, root, "##")
    for name in cli.list_commands(root):
        command = cli.get_command(root, name)
        if command is None or command.hidden:
            continue
        lines += _command_section(command, click.Context(command, info_name=name, parent=root), "##")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gradindex.cli.docs", description="Generate the gradindex CLI reference (markdown)."
    )
    parser.add_argument("-o", "--output", type=Path, help="write the reference here (default: stdout)")
    parser.add_argument(
        "--check", type=Path, metavar="FILE", help="exit 1 if FILE differs from the generated reference"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.check is not None:
        current = args.check.read_text() if args.check.is_file() else ""
        if current != text:
            print(f"{args.check} is stale; regenerate it with `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
