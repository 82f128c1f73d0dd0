"""The package layout: rooms install as cm3 sub-packages; HF `tokenizers` is never shadowed; every command has help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, cm3


def test_hf_tokenizers_is_not_shadowed_from_the_repository_root():
    code = (
        "import tokenizers, cm3.tokenizers, open_clip;"
        "print(tokenizers.__file__); print(list(cm3.tokenizers.__path__)[0]);"
        "print(tokenizers.Tokenizer.__module__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    hf_file, ours, tokenizer_module = proc.stdout.split()
    assert "site-packages" in hf_file and not hf_file.startswith(str(REPO) + "/tokenizers")
    assert ours == str(REPO / "tokenizers")
    assert tokenizer_module.startswith("tokenizers")


def test_rooms_are_subpackages_of_cm3():
    import importlib

    for folder in ("core", "pipeline", "synthetic", "index", "model", "workflows"):
        assert importlib.import_module(f"cm3.{folder}").__file__ == str(REPO / folder / "__init__.py")


GROUPS = ["demo-data", "tokenizer", "clip", "sft", "model"]
COMMANDS = [["ingest"], ["tokenize"], ["train"], ["build-index"], ["search"], ["generate"], ["caption"], ["demo"],
            ["demo-data", "serve"], ["demo-data", "write-urls"], ["tokenizer", "train-vq"],
            ["tokenizer", "train-text"], ["tokenizer", "build"], ["clip", "train"], ["sft", "convert"],
            ["sft", "demo"], ["model", "init"]]


def test_the_console_script_is_installed():
    proc = cm3("--help", check=True)
    assert "Usage: cm3" in proc.stdout and all(group in proc.stdout for group in GROUPS)


@pytest.mark.parametrize("command", [*([g] for g in GROUPS), *COMMANDS], ids=" ".join)
def test_every_command_has_help_with_examples(command):
    from typer.testing import CliRunner

    from cm3.workflows.cli import app

    result = CliRunner().invoke(app, [*command, "--help"], prog_name="cm3")
    assert result.exit_code == 0, result.output
    assert "Usage: cm3" in result.output
    if command in COMMANDS:
        assert "Example" in result.output
