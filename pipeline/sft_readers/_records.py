"""What the readers share: records streamed out of JSON, JSON Lines and text files, and field checks whose errors
name the file, the record and the field.

JSON documents are read with ijson, one record at a time, so a 300 MB annotations file is never held whole; what a
format joins (VQA answers to questions, COCO captions to images) is the only thing kept.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import ijson

from cm3.core.errors import InputError
from cm3.pipeline.image_folder import ImageRef


def _first_line(err: Exception) -> str:
    text = err.args[0] if err.args else str(err)
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _open(path: Path):
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    return path.open("rb")


def json_items(path: Path, prefix: str, expected: str) -> Iterator[object]:
    """The values at ijson ``prefix`` (``item``: a top-level list; ``images.item``: the list under ``images``),
    one at a time. ``expected`` says what the file should be, for the error when it is not JSON or has no such
    list."""
    count = 0
    with _open(path) as handle:
        try:
            for count, value in enumerate(ijson.items(handle, prefix, use_float=True), start=1):
                yield value
        except ijson.JSONError as err:
            raise InputError(f"{path}: not valid JSON ({_first_line(err)}); expected {expected}") from err
    if count == 0:
        _require_container(path, prefix.rpartition(".")[0] if "." in prefix else "", "start_array", expected)


def json_pairs(path: Path, expected: str) -> Iterator[tuple[str, object]]:
    """(key, value) of a top-level JSON object, one pair at a time."""
    count = 0
    with _open(path) as handle:
        try:
            for count, pair in enumerate(ijson.kvitems(handle, "", use_float=True), start=1):
                yield pair
        except ijson.JSONError as err:
            raise InputError(f"{path}: not valid JSON ({_first_line(err)}); expected {expected}") from err
    if count == 0:
        _require_container(path, "", "start_map", expected)


def _require_container(path: Path, prefix: str, event: str, expected: str) -> None:
    """An empty result is fine only if the container is there (an empty list), not if it is missing."""
    with _open(path) as handle:
        try:
            if any(p == prefix and e == event for p, e, _ in ijson.parse(handle)):
                return
        except ijson.JSONError as err:
            raise InputError(f"{path}: not valid JSON ({_first_line(err)}); expected {expected}") from err
    raise InputError(f"{path}: expected {expected}")


def load_json(path: Path, expected: str) -> object:
    """A small JSON file (a split file) whole."""
    with _open(path) as handle:
        try:
            return json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{path}: not valid JSON ({err}); expected {expected}") from err


def jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) of a JSON Lines file, one line at a time; blank lines are skipped."""
    with _open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise InputError(f"{where}: not valid JSON ({err})") from err
            yield where, record_dict(record, where)


def records(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) of a JSON Lines file (``.jsonl``) or of a JSON list of objects, one at a time."""
    if path.suffix == ".jsonl":
        yield from jsonl_records(path)
        return
    for i, record in enumerate(json_items(path, "item", "a JSON list of records (or a .jsonl file)")):
        where = f"{path}: record {i}"
        yield where, record_dict(record, where)


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) of a UTF-8 text file, one line at a time."""
    with _open(path) as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise InputError(f"{path}: line {number}: not UTF-8 text ({err})") from err


def record_dict(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def field(record: dict, name: str, where: str) -> object:
    if record.get(name) is None:
        raise InputError(f"{where}: missing required field {name!r}")
    return record[name]


def text(record: dict, names: str | Sequence[str], where: str) -> str:
    """The first present field of ``names`` (aliases) as a stripped string, maybe empty (the converter counts
    an empty text as a skipped record); a missing or non-string field is an error."""
    names = (names,) if isinstance(names, str) else tuple(names)
    value = next((record[name] for name in names if record.get(name) is not None), None)
    if not isinstance(value, str):
        raise InputError(f"{where}: missing required text field {' or '.join(map(repr, names))}")
    return value.strip()


def image_ref(record: dict, names: str | Sequence[str], where: str) -> ImageRef:
    names = (names,) if isinstance(names, str) else tuple(names)
    value = next((record[name] for name in names if record.get(name) is not None), None)
    if not isinstance(value, (str, int)) or isinstance(value, bool) or value == "":
        raise InputError(f"{where}: missing required image field {' or '.join(map(repr, names))}")
    return value


def items_list(record: dict, name: str, where: str, nonempty: bool = True) -> list:
    value = field(record, name, where)
    if not isinstance(value, list) or (nonempty and not value):
        raise InputError(f"{where}: {name!r} must be a {'non-empty ' if nonempty else ''}list")
    return value


def consensus(record: dict, where: str) -> str:
    """The most common ``answer`` of a record's ``answers`` (ties go to the earliest), as the VizWiz authors' and
    OK-VQA's loaders pick it; maybe empty."""
    answers = items_list(record, "answers", where)
    votes = Counter(text(answer if isinstance(answer, dict) else {}, "answer", f"{where}: answers[{i}]")
                    for i, answer in enumerate(answers))
    return votes.most_common(1)[0][0]
