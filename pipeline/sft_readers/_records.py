"""What the readers of published formats share: JSON records with errors that name the file and record, and
rows of single-image tasks whose images are loaded and VQ-encoded in batches (each image once)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cm3.core.errors import InputError
from cm3.pipeline.sft_tasks import ImageLoader, ImageRef, TaskRow, chunks, encode_images, load_images, make_row
from cm3.tokenizers.multimodal import MultimodalTokenizer


def load_json(path: Path) -> object:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON: {err}") from err


def read_records(path: Path) -> list[tuple[str, dict]]:
    """(where, record) of a JSONL file (one object a line) or a JSON list of objects."""
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    records.append((f"{path}: line {number}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise InputError(f"{path}: line {number}: not valid JSON: {err}") from err
    else:
        data = load_json(path)
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of records (or a .jsonl file)")
        records = [(f"{path}: record {i}", record) for i, record in enumerate(data)]
    for where, record in records:
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return records


def json_list(data: object, name: str, path: Path) -> list[dict]:
    if not isinstance(data, dict) or not isinstance(data.get(name), list):
        raise InputError(f"{path}: expected a JSON object with a list {name!r}")
    return data[name]


def field(record: dict, name: str, where: str) -> object:
    if not isinstance(record, dict) or record.get(name) is None:
        raise InputError(f"{where}: missing required field {name!r}")
    return record[name]


def text_field(record: dict, names: Sequence[str], where: str) -> str:
    """The first present field of ``names`` (aliases), as a stripped non-empty string."""
    value = next((record[name] for name in names if record.get(name) is not None), None)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: missing required text field {' or '.join(map(repr, names))}")
    return value.strip()


def image_ref(record: dict, names: Sequence[str], where: str) -> ImageRef:
    value = next((record[name] for name in names if record.get(name) is not None), None)
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise InputError(f"{where}: missing required image field {' or '.join(map(repr, names))}")
    return value


@dataclass(frozen=True)
class ImageExamples:
    """One image and the (key, input_text, output_text) examples that share it, so it is encoded once."""

    ref: ImageRef
    where: str
    examples: list[tuple[str, str | None, str | None]]


def single_image_rows(groups: Iterable[ImageExamples], task: str, image_column: str,
                      tokenizer: MultimodalTokenizer, image_loader: ImageLoader, seed: int,
                      batch_size: int) -> Iterator[TaskRow]:
    """Rows of ``task``, each group's image loaded and encoded once (``image_column`` holds its codes)."""
    for chunk in chunks(groups, batch_size):
        codes = encode_images(tokenizer, load_images(image_loader, [(g.ref, g.where) for g in chunk]))
        for group, image_codes in zip(chunk, codes):
            for key, input_text, output_text in group.examples:
                yield make_row(tokenizer, task, key, seed, input_text=input_text, output_text=output_text,
                               **{image_column: image_codes})
