"""Readers of published instruction-tuning formats: each module here reads one format into SFT task rows.

A module registers its readers in ``READERS`` (``--task`` name -> ``Reader``); ``readers()`` finds every module of
this folder, so adding a format (Flickr30k, VizWiz, OKVQA, ScienceQA, ...) is one new module and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cm3.core.errors import InputError
from cm3.pipeline.sft_tasks import ImageLoader, TaskRow
from cm3.tokenizers.multimodal import MultimodalTokenizer


@dataclass(frozen=True)
class Reader:
    """One format read into rows of one task: ``read(source, [annotations,] tokenizer, image_loader, seed)``."""

    read: Callable[..., Iterator[TaskRow]]
    source: str  # what the source file is, for help and errors
    annotations: str | None = None  # what the second file is, for formats that need one

    def rows(self, source: Path, tokenizer: MultimodalTokenizer, image_loader: ImageLoader, seed: int = 0,
             annotations: Path | None = None) -> Iterator[TaskRow]:
        if self.annotations is None:
            return self.read(source, tokenizer, image_loader, seed)
        if annotations is None:
            raise InputError(f"{source}: this format needs a second file, {self.annotations}")
        return self.read(source, annotations, tokenizer, image_loader, seed)


def readers() -> dict[str, Reader]:
    """Every reader of every module in this folder, by ``--task`` name."""
    found: dict[str, Reader] = {}
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            found.update(importlib.import_module(f"{__name__}.{module.name}").READERS)
    return dict(sorted(found.items()))
