"""What ``cm3 eval`` reads, in the formats users have, with errors that name the file and what was expected.

- prompts: a COCO captions JSON (one prompt per annotation), a JSONL of ``{"prompt": ...}``, or cm3 shards (raw,
  token or augmented: their ``caption`` column);
- reference images: a folder of image files or cm3 raw shards (``cm3 ingest --out``), as uint8 batches at the
  generated images' size through the project's one preprocessing (``cm3.core.images.square_pixels``);
- images by name for captioning and VQA: a folder (``DIR/name``) or raw shards (the row whose URL ends in ``name``);
- caption references (COCO captions JSON) and VQA2 questions with their annotations (all ten human answers).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from cm3.core.errors import InputError
from cm3.core.images import decode, square_pixels
from cm3.core.shards import complete_shards, parquet_path
from cm3.pipeline.image_folder import ImageFolder, OutsideRoot
from cm3.pipeline.sft_readers._records import field, json_items, jsonl_records, record_dict, text
from cm3.pipeline.sft_readers.coco import EXPECTED as COCO_EXPECTED
from cm3.pipeline.sft_readers.coco import image_files

VQA_QUESTIONS = "a VQA2 questions file: an object with a list 'questions'"
VQA_ANNOTATIONS = "a VQA2 annotations file: an object with a list 'annotations'"

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def read_prompts(path: Path, limit: int | None = None, seed: int = 0) -> list[str]:
    """The prompts of ``path``; with ``limit``, that many drawn at random (``seed``), in file order."""
    path = Path(path)
    if path.is_dir():
        prompts = [c for table in _shard_tables(path, ["caption"]) for c in table["caption"].to_pylist() if c]
    elif path.suffix == ".jsonl":
        prompts = [text(record, "prompt", where) for where, record in jsonl_records(path)]
    elif path.suffix == ".json":
        prompts = [caption for _, captions in _coco_captions(path) for caption in captions]
    elif not path.exists():
        raise InputError(f"{path}: no such file or folder")
    else:
        raise InputError(f"{path}: expected a COCO captions .json, a .jsonl of {{\"prompt\": ...}} or a folder of "
                         f"cm3 shards")
    if not prompts:
        raise InputError(f"{path}: holds no prompts")
    if limit is not None and limit < len(prompts):
        prompts = [prompts[i] for i in sorted(random.Random(seed).sample(range(len(prompts)), limit))]
    return prompts


def _shard_tables(folder: Path, columns: list[str]):
    shards = complete_shards(folder)
    if not shards:
        raise InputError(f"{folder}: no complete cm3 shards (NNNNN.parquet with NNNNN_stats.json)")
    for shard in shards:
        schema = pq.read_schema(parquet_path(folder, shard))
        if missing := [c for c in columns if c not in schema.names]:
            raise InputError(f"{parquet_path(folder, shard)}: has no column {missing[0]!r} "
                             f"(columns: {', '.join(schema.names)})")
        yield pq.read_table(parquet_path(folder, shard), columns=columns)


def _raw_shard_rows(folder: Path, columns: list[str]):
    """Tables of the successful rows of raw shards; token shards (no ``jpg``) are refused by name."""
    for table in _shard_tables(folder, ["jpg", "status", *columns]):
        yield table.filter(pc.and_(pc.equal(table["status"], "success"), pc.is_valid(table["jpg"])))


def _pixels_from_bytes(data: bytes, size: int, where: str) -> np.ndarray:
    try:
        return square_pixels(decode(data), size)
    except OSError as err:
        raise InputError(f"{where}: not a readable image: {err}") from err


def _pixels_from_file(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return square_pixels(image, size)
    except OSError as err:
        raise InputError(f"{path}: not a readable image: {err}") from err


def as_batch(pixels: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] pixels -> the uint8 [B, 3, H, W] batch the Inception network takes."""
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class ReferenceImages:
    """The real images generated ones are compared with: image files in a folder, or the rows of raw shards."""

    path: Path
    files: tuple[Path, ...]  # empty for raw shards
    count: int

    @classmethod
    def open(cls, path: Path) -> ReferenceImages:
        path = Path(path)
        if not path.is_dir():
            raise InputError(f"{path}: references must be a folder of images or of cm3 raw shards "
                             f"({'no such folder' if not path.exists() else 'this is a file'})")
        files = tuple(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        if files:
            references = cls(path, files, len(files))
        elif complete_shards(path):
            references = cls(path, (), sum(t.num_rows for t in _raw_shard_rows(path, [])))
        else:
            raise InputError(f"{path}: holds neither image files ({', '.join(IMAGE_SUFFIXES)}) nor complete cm3 raw "
                             f"shards")
        if references.count < 2:
            raise InputError(f"{path}: {references.count} reference image(s); a Fréchet distance needs at least 2")
        return references

    def fingerprint(self) -> str:
        """Changes when the set of images (names, sizes, times) changes: the key of cached statistics."""
        entries = self.files or [parquet_path(self.path, s) for s in complete_shards(self.path)]
        digest = hashlib.sha256()
        for entry in entries:
            stat = entry.stat()
            digest.update(f"{entry}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:16]

    def batches(self, size: int, batch_size: int) -> Iterator[list[np.ndarray]]:
        """Every reference image as uint8 [size, size, 3] pixels, centre-cropped and resized as ingest does, in
        lists of ``batch_size``."""
        if self.files:
            for start in range(0, len(self.files), batch_size):
                yield [_pixels_from_file(p, size) for p in self.files[start:start + batch_size]]
            return
        for table in _raw_shard_rows(self.path, ["key"]):
            for batch in table.to_batches(batch_size):
                keys, jpgs = batch.column("key").to_pylist(), batch.column("jpg").to_pylist()
                yield [_pixels_from_bytes(j, size, f"{self.path}: key {k}") for k, j in zip(keys, jpgs)]


class NamedImages:
    """Images looked up by file name: ``DIR/name`` in a folder, or the raw-shard row whose URL ends in ``/name``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(f"{self.path}: images must be a folder of image files or of cm3 raw shards")
        self._shard_rows: dict[str, bytes] | None = None
        if complete_shards(self.path):
            self._shard_rows = {}
            for table in _raw_shard_rows(self.path, ["url"]):
                for url, jpg in zip(table["url"].to_pylist(), table["jpg"].to_pylist()):
                    self._shard_rows[url.rsplit("/", 1)[-1]] = jpg

    def pixels(self, name: str, size: int) -> np.ndarray:
        if self._shard_rows is None:  # the name comes from a reference file: it may not leave the folder
            try:
                path = ImageFolder(self.path).locate(name)
            except OutsideRoot as err:
                raise InputError(f"{self.path}: the image name {name!r} leads outside the folder; it was not "
                                 "opened") from err
            except FileNotFoundError as err:
                raise InputError(f"{self.path / name}: no such image file") from err
            if not path.is_file():
                raise InputError(f"{self.path / name}: no such image file")
            return _pixels_from_file(path, size)
        if name not in self._shard_rows:
            raise InputError(f"{self.path}: no successful raw-shard row has a URL ending in /{name}")
        return _pixels_from_bytes(self._shard_rows[name], size, f"{self.path}: {name}")


@dataclass(frozen=True)
class CaptionReference:
    image: str  # file name
    captions: list[str]


def _coco_captions(path: Path) -> list[tuple[str, list[str]]]:
    """(file_name, captions) per annotated image of a COCO captions file, in the file's order."""
    files = {image_id: str(name) for image_id, name in image_files(path).items()}
    captions: dict[object, list[str]] = {}
    for i, annotation in enumerate(json_items(path, "annotations.item", COCO_EXPECTED)):
        where = f"{path}: annotations[{i}]"
        image_id = field(record_dict(annotation, where), "image_id", where)
        if image_id not in files:
            raise InputError(f"{where}: image_id {image_id!r} is not in the file's images")
        captions.setdefault(image_id, []).append(text(annotation, "caption", where))
    return [(files[image_id], texts) for image_id, texts in captions.items()]


def read_caption_references(path: Path) -> list[CaptionReference]:
    """One entry per annotated image of a COCO captions JSON: its file name and its reference captions."""
    references = [CaptionReference(name, captions) for name, captions in _coco_captions(Path(path))]
    if not references:
        raise InputError(f"{path}: holds no annotated images")
    return references


@dataclass(frozen=True)
class VQAQuestion:
    question_id: object
    image_id: object
    question: str
    answers: list[str]  # every human answer (ten in VQA2)


def read_vqa(questions_json: Path, annotations_json: Path) -> list[VQAQuestion]:
    """VQA2's questions file and annotations file joined by question id (every question needs its answers)."""
    questions_json, annotations_json = Path(questions_json), Path(annotations_json)
    answers: dict[object, list[str]] = {}
    for i, annotation in enumerate(json_items(annotations_json, "annotations.item", VQA_ANNOTATIONS)):
        where = f"{annotations_json}: annotations[{i}]"
        human = field(record_dict(annotation, where), "answers", where)
        if not isinstance(human, list) or not human:
            raise InputError(f"{where}: 'answers' must be a non-empty list of {{\"answer\": ...}}")
        answers[field(annotation, "question_id", where)] = [
            text(record_dict(a, f"{where}.answers[{j}]"), "answer", f"{where}.answers[{j}]")
            for j, a in enumerate(human)]
    out = []
    for i, question in enumerate(json_items(questions_json, "questions.item", VQA_QUESTIONS)):
        where = f"{questions_json}: questions[{i}]"
        question_id = field(record_dict(question, where), "question_id", where)
        if question_id not in answers:
            raise InputError(f"{where}: question_id {question_id!r} has no annotation in {annotations_json}")
        out.append(VQAQuestion(question_id, field(question, "image_id", where),
                               text(question, "question", where), answers[question_id]))
    if not out:
        raise InputError(f"{questions_json}: holds no questions")
    return out
