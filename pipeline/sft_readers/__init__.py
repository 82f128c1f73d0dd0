"""Readers of published instruction-tuning formats: each module here reads one data set's files into examples.

A module registers its formats in ``FORMATS`` (``--format`` name -> ``Format``); ``formats()`` finds every module
of this folder, so adding a data set is one new module and nothing else. A reader streams its files, checks each
record (an error names the file, the record and the field) and yields ``cm3.pipeline.sft_examples.Example`` (or
``Skipped``); it never opens an image.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cm3.core.errors import InputError
from cm3.pipeline.sft_examples import Example, Skipped

# The format `cm3 sft convert --task T` reads when --format is not given (the readers it had before --format).
DEFAULT_FORMATS = {"captioning": "coco", "text_to_image": "coco", "vqa": "vqa2", "image_editing": "instructpix2pix",
                   "grounded_generation": "grounded"}


@dataclass(frozen=True)
class Sources:
    """The files of one conversion: ``--source`` and, for the formats that take them, ``--annotations``,
    ``--splits`` (a split file) and ``--split`` (a split's name)."""

    source: Path
    annotations: Path | None = None
    splits: Path | None = None
    split: str | None = None


@dataclass(frozen=True)
class Format:
    """One published file format: ``examples(sources, task)`` yields its records for one of ``tasks``.

    ``source``, ``annotations``, ``splits`` and ``split`` say what each option is for this format (for help and
    errors); None for an option the format does not take. A format that names ``annotations`` needs it.
    """

    examples: Callable[[Sources, str], Iterator[Example | Skipped]]
    tasks: tuple[str, ...]
    source: str
    annotations: str | None = None
    splits: str | None = None
    split: str | None = None

    def read(self, name: str, task: str, sources: Sources) -> Iterator[Example | Skipped]:
        """``examples`` after checking that the task and the options fit this format."""
        if task not in self.tasks:
            raise InputError(f"--format {name} feeds {', '.join(self.tasks)}, not --task {task}")
        if self.annotations is not None and sources.annotations is None:
            raise InputError(f"--format {name} needs --annotations: {self.annotations}")
        for option, wanted in (("annotations", self.annotations), ("splits", self.splits), ("split", self.split)):
            if wanted is None and getattr(sources, option) is not None:
                raise InputError(f"--format {name} takes no --{option}")
        return self.examples(sources, task)


def formats() -> dict[str, Format]:
    """Every format of every module in this folder, by ``--format`` name."""
    found: dict[str, Format] = {}
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            found.update(importlib.import_module(f"{__name__}.{module.name}").FORMATS)
    return dict(sorted(found.items()))
