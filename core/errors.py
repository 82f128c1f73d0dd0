"""The project's error type for bad user input (``cm3`` commands exit with code 2 on it)."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: the message names the file, row or field and what was expected."""
