"""The documentation's `cm3` command lines are real: every one in README.md and docs/ names a command that exists
and options that parse (names, values, required ones), so the guide cannot drift from the command line."""

from __future__ import annotations

import shlex

import pytest
import typer

from cm3.workflows.cli import app

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _documented_command_lines():
    """Each `cm3 ...` command inside a ```bash block (continued over lines ending in a backslash), as arguments
    after `cm3`, with the page and its first line as its id."""
    for page in PAGES:
        in_bash, command, start = False, "", 0
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_bash = line.strip() == "```bash"
            elif in_bash and (command or line.lstrip().startswith("cm3 ")):
                command, start = command + line.rstrip().removesuffix("\\"), start or number
                if not line.rstrip().endswith("\\"):
                    yield pytest.param(shlex.split(command, comments=True)[1:], id=f"{page.name}:{start}")
                    command, start = "", 0


COMMAND_LINES = list(_documented_command_lines())
CM3 = typer.main.get_command(app)


def test_the_guide_shows_the_whole_chain():
    shown = {" ".join(args[:2]) if args[0] in ("tokenizer", "clip", "sft") else args[0]
             for args in (p.values[0] for p in COMMAND_LINES)}
    assert {"ingest", "tokenizer train-vq", "tokenizer train-text", "tokenizer build", "clip train", "tokenize",
            "build-index", "train", "sft convert", "generate", "caption"} <= shown


@pytest.mark.parametrize("args", COMMAND_LINES)
def test_documented_command_line_parses(args):
    command, name, rest = CM3, "cm3", list(args)
    while hasattr(command, "commands"):  # a group: the next word names the command
        assert rest and rest[0] in command.commands, f"cm3 {' '.join(args)}: no command {rest[:1]} in {name}"
        name, rest = rest[0], rest[1:]
        command = command.commands[name]
    command.make_context(name, rest)  # parses and converts every option; raises on an unknown or bad one
