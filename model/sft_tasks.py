"""Instruction-tuning (SFT) task shards: CM3Leon's stage-2 data, from public formats or the demo.

CM3Leon's SFT concatenates instruction and answer into one document and trains it with the same
CM3 objective as pretraining, so an SFT example is one more joint-id sequence. Rows keep their
parts next to the sequence so that data can be inspected, filtered by task or laid out again
without decoding and re-encoding images.

Shard format: ``DIR/NNNNN.parquet`` (one row per example) and ``DIR/NNNNN_stats.json``
(``{"count", "tasks": {task: rows}, "tokens_per_image"}``); a shard is complete once its stats
file exists, which is written last (the commit rule of `cm3.pipeline.raw_shards`). Columns
(`sft_schema`, N = tokens_per_image)::

    task              string not null   captioning | vqa | text_to_image | image_editing | grounded_generation
    template          int32 not null    index into TEMPLATES[task]
    instruction       string not null   TEMPLATES[task][template] filled with input_text
    input_text        string            question (vqa), caption (text_to_image), edit (image_editing),
                                        object boxes (grounded_generation); null for captioning
    input_image_ids   fixed_size_list<int16>[N]  VQ codes of the conditioning image
                                        (captioning, vqa, image_editing), else null
    output_text       string            caption (captioning) or answer (vqa), else null
    output_image_ids  fixed_size_list<int16>[N]  VQ codes of the image to generate
                                        (text_to_image, image_editing, grounded_generation), else null
    key               string not null   unique example id
    ids               list<int32> not null  the joint-id sequence below: what the model trains on

Layouts (`layout_example`; IMG is N joint image ids; the answer is BPE-encoded apart from the
instruction with a leading space, so the text part decodes to ``instruction + " " + answer``)::

    captioning, vqa       <eod> IMG_in <break> instruction answer <eod>
    text_to_image         <eod> instruction <break> IMG_out <eod>
    grounded_generation   <eod> instruction <break> IMG_out <eod>
    image_editing         <eod> EDIT_SOURCE_PROMPTS[template] <break> IMG_in <break> instruction <break> IMG_out <eod>

Image-to-text tasks put the image first so the answer is conditioned on it (the paper's
captioning order). Editing is the paper's two-image layout: instruction1 names the input image,
instruction2 is the edit. Grounded boxes read ``{name} at (x1, y1) -> (x2, y2)`` with integer
coordinates 0..100 relative to the square the image is centre-cropped to (resolution-independent
and a small set of number tokens); several objects are joined by ", ".

Every image (real or demo) is centre-cropped to a square and resized to the VQ-GAN's resolution.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import TypedDict, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from cm3.pipeline import raw_shards
from cm3.pipeline.url_list import InputError
from cm3.tokenizers.multimodal import MultimodalTokenizer
from cm3.workflows.demo import shapes

ImageRef = str | int  # a file name, path or image id, resolved by the caller's image loader
ImageLoader = Callable[[ImageRef], Image.Image]
PathLike = str | os.PathLike

TEMPLATES: dict[str, tuple[str, ...]] = {
    "captioning": ("describe the image.", "write a caption for this image.", "what does this picture show?"),
    "vqa": ("{text}", "question: {text} answer:", "answer the question about the image. {text}"),
    "text_to_image": ("{text}", "generate an image of {text}.", "draw: {text}"),
    "image_editing": ("{text}", "edit the image: {text}", "now {text}"),
    "grounded_generation": ("{text}", "generate an image with {text}.", "an image showing {text}"),
}
TASKS: tuple[str, ...] = tuple(TEMPLATES)
# instruction1 of the two-image editing layout, one per editing template: it names the input image.
EDIT_SOURCE_PROMPTS: tuple[str, ...] = ("the original image", "here is an image.", "input image:")
BOX_SCALE = 100  # grounded coordinates are integers in [0, BOX_SCALE], rounded half up
DEMO_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("what colour is the shape?", "colour"),
    ("what shape is it?", "shape"),
    ("where is the shape?", "position"),
)


class TaskRow(TypedDict):
    """One example, as stored (image codes as int16 arrays)."""

    task: str
    template: int
    instruction: str
    input_text: str | None
    input_image_ids: np.ndarray | None
    output_text: str | None
    output_image_ids: np.ndarray | None
    key: str
    ids: list[int]


def sft_schema(tokens_per_image: int) -> pa.Schema:
    """The task-shard schema documented in the module docstring."""
    image = pa.list_(pa.int16(), tokens_per_image)
    return pa.schema([
        pa.field("task", pa.string(), nullable=False),
        pa.field("template", pa.int32(), nullable=False),
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("input_text", pa.string()),
        pa.field("input_image_ids", image),
        pa.field("output_text", pa.string()),
        pa.field("output_image_ids", image),
        pa.field("key", pa.string(), nullable=False),
        pa.field("ids", pa.list_(pa.int32()), nullable=False),
    ])


# --- layout ------------------------------------------------------------------------------------------


def layout_example(tokenizer: MultimodalTokenizer, row: TaskRow) -> list[int]:
    """The joint-id sequence of one row, in the layout of its task (module docstring)."""
    vocab, task = tokenizer.vocab, row["task"]

    def image(column: str) -> list[int]:
        codes = row.get(column)
        if codes is None or np.size(codes) != tokenizer.tokens_per_image:
            raise ValueError(f"{task} row {row.get('key')!r}: {column} must hold {tokenizer.tokens_per_image} codes")
        return vocab.image_ids(np.asarray(codes)).reshape(-1).tolist()

    instruction = tokenizer.encode_caption(row["instruction"])
    if task in ("captioning", "vqa"):
        if not row.get("output_text"):
            raise ValueError(f"{task} row {row.get('key')!r}: output_text is empty")
        answer = tokenizer.encode_caption(" " + row["output_text"])
        parts = [(True, image("input_image_ids")), (False, instruction + answer)]
    elif task in ("text_to_image", "grounded_generation"):
        parts = [(False, instruction), (True, image("output_image_ids"))]
    elif task == "image_editing":
        source = tokenizer.encode_caption(EDIT_SOURCE_PROMPTS[row["template"]])
        parts = [(False, source), (True, image("input_image_ids")), (False, instruction),
                 (True, image("output_image_ids"))]
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    # cm3: <eod> part <break> part ... <eod>; a Chameleon vocabulary: <s> text <racm3:break> IMG <eoss> ... </s>
    return [vocab.bos, *vocab.join(parts), vocab.eos]


def make_row(tokenizer: MultimodalTokenizer, task: str, key: str, seed: int, *, input_text: str | None = None,
             input_image_ids: np.ndarray | None = None, output_text: str | None = None,
             output_image_ids: np.ndarray | None = None) -> TaskRow:
    """A complete row: the template is drawn from (seed, task, key), so reruns pick the same one."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(f"{task}\0{key}".encode())]))
    template = int(rng.integers(len(TEMPLATES[task])))
    row = TaskRow(task=task, template=template, instruction=TEMPLATES[task][template].format(text=input_text),
                  input_text=input_text, input_image_ids=input_image_ids, output_text=output_text,
                  output_image_ids=output_image_ids, key=key, ids=[])
    row["ids"] = layout_example(tokenizer, row)
    return row


# --- images ------------------------------------------------------------------------------------------


def _centre_crop_box(width: int, height: int) -> tuple[int, int, int]:
    """(left, top, side) of the centred square every image is cut to before resizing."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


def _square_pixels(image: Image.Image, resolution: int) -> np.ndarray:
    image = image.convert("RGB")
    left, top, side = _centre_crop_box(*image.size)
    square = image.crop((left, top, left + side, top + side))
    if square.size != (resolution, resolution):
        square = square.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(square)


def encode_images(tokenizer: MultimodalTokenizer, images: Sequence[Image.Image]) -> np.ndarray:
    """VQ codes int16 [B, N] of images of any size, in one batch (centre crop, resize)."""
    resolution = tokenizer.vq.config.resolution
    pixels = np.stack([_square_pixels(image, resolution) for image in images])
    device = next(tokenizer.vq.parameters()).device
    batch = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return tokenizer.vq.encode(batch).reshape(len(images), -1).cpu().numpy().astype(np.int16)


def _load_images(loader: ImageLoader, refs: Sequence[tuple[ImageRef, str]]) -> list[Image.Image]:
    """Each (ref, where) through the caller's loader; a failure names the file and record."""
    images = []
    for ref, where in refs:
        try:
            image = loader(ref)
        except (OSError, ValueError, LookupError) as err:
            raise InputError(f"{where}: image {ref!r} could not be loaded: {type(err).__name__}: {err}") from err
        if not isinstance(image, Image.Image):
            raise InputError(f"{where}: the image loader returned {type(image).__name__} for {ref!r}, not a PIL image")
        images.append(image)
    return images


# --- reading annotation files ------------------------------------------------------------------------

T = TypeVar("T")


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _load_json(path: Path) -> object:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON: {err}") from err


def _read_records(path: Path) -> list[tuple[str, dict]]:
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
        data = _load_json(path)
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of records (or a .jsonl file)")
        records = [(f"{path}: record {i}", record) for i, record in enumerate(data)]
    for where, record in records:
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return records


def _list(data: object, name: str, path: Path) -> list[dict]:
    if not isinstance(data, dict) or not isinstance(data.get(name), list):
        raise InputError(f"{path}: expected a JSON object with a list {name!r}")
    return data[name]


def _field(record: dict, name: str, where: str) -> object:
    if not isinstance(record, dict) or record.get(name) is None:
        raise InputError(f"{where}: missing required field {name!r}")
    return record[name]


def _text(record: dict, names: Sequence[str], where: str) -> str:
    """The first present field of ``names`` (aliases), as a stripped non-empty string."""
    value = next((record[name] for name in names if record.get(name) is not None), None)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: missing required text field {' or '.join(map(repr, names))}")
    return value.strip()


def _image_ref(record: dict, names: Sequence[str], where: str) -> ImageRef:
    value = next((record[name] for name in names if record.get(name) is not None), None)
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise InputError(f"{where}: missing required image field {' or '.join(map(repr, names))}")
    return value


@dataclass(frozen=True)
class _ImageExamples:
    """One image and the (key, input_text, output_text) examples that share it, so it is encoded once."""

    ref: ImageRef
    where: str
    examples: list[tuple[str, str | None, str | None]]


def _coco_captions(path: Path) -> list[tuple[ImageRef, str, list[tuple[str, str]]]]:
    """(file_name, where, [(key, caption)]) per annotated image of a COCO captions file."""
    data = _load_json(path)
    files: dict[object, tuple[ImageRef, str]] = {}
    for i, image in enumerate(_list(data, "images", path)):
        where = f"{path}: images[{i}]"
        files[_field(image, "id", where)] = (_image_ref(image, ("file_name",), where), where)
    captions: dict[object, list[tuple[str, str]]] = {}
    for i, annotation in enumerate(_list(data, "annotations", path)):
        where = f"{path}: annotations[{i}]"
        image_id = _field(annotation, "image_id", where)
        if image_id not in files:
            raise InputError(f"{where}: image_id {image_id!r} is not in the file's images")
        key = f"{path.name}:{_field(annotation, 'id', where)}"
        captions.setdefault(image_id, []).append((key, _text(annotation, ("caption",), where)))
    return [(*files[image_id], pairs) for image_id, pairs in captions.items()]


def _single_image_rows(groups: Iterable[_ImageExamples], task: str, image_column: str,
                       tokenizer: MultimodalTokenizer, image_loader: ImageLoader, seed: int,
                       batch_size: int) -> Iterator[TaskRow]:
    for chunk in _chunks(groups, batch_size):
        codes = encode_images(tokenizer, _load_images(image_loader, [(g.ref, g.where) for g in chunk]))
        for group, image_codes in zip(chunk, codes):
            for key, input_text, output_text in group.examples:
                yield make_row(tokenizer, task, key, seed, input_text=input_text, output_text=output_text,
                               **{image_column: image_codes})


# --- converters --------------------------------------------------------------------------------------


def captioning_rows(coco_json: PathLike, tokenizer: MultimodalTokenizer, image_loader: ImageLoader,
                    seed: int = 0, batch_size: int = 32) -> Iterator[TaskRow]:
    """Captioning rows from a COCO captions file (``images``: id, file_name; ``annotations``: image_id,
    id, caption), one per annotation; ``image_loader`` receives the file_name."""
    path = Path(coco_json)
    groups = [_ImageExamples(ref, where, [(key, None, caption) for key, caption in pairs])
              for ref, where, pairs in _coco_captions(path)]
    return _single_image_rows(groups, "captioning", "input_image_ids", tokenizer, image_loader, seed, batch_size)


def text_to_image_rows(source: PathLike | Iterable[tuple[ImageRef, str]], tokenizer: MultimodalTokenizer,
                       image_loader: ImageLoader, seed: int = 0, batch_size: int = 32) -> Iterator[TaskRow]:
    """Text-to-image rows from a COCO captions file (as `captioning_rows`) or from (image, caption) pairs."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        groups = [_ImageExamples(ref, where, [(key, caption, None) for key, caption in pairs])
                  for ref, where, pairs in _coco_captions(path)]
    else:
        by_image: dict[ImageRef, _ImageExamples] = {}
        for i, pair in enumerate(source):
            where = f"pairs[{i}]"
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InputError(f"{where}: expected an (image, caption) pair")
            ref = _image_ref({"image": pair[0]}, ("image",), where)
            caption = _text({"caption": pair[1]}, ("caption",), where)
            by_image.setdefault(ref, _ImageExamples(ref, where, [])).examples.append((f"pair:{i}", caption, None))
        groups = list(by_image.values())
    return _single_image_rows(groups, "text_to_image", "output_image_ids", tokenizer, image_loader, seed, batch_size)


def vqa_rows(questions_json: PathLike, annotations_json: PathLike, tokenizer: MultimodalTokenizer,
             image_loader: ImageLoader, seed: int = 0, batch_size: int = 32) -> Iterator[TaskRow]:
    """VQA rows from VQA2 files (``questions``: image_id, question, question_id; ``annotations``:
    question_id, image_id, multiple_choice_answer), one per question, answered with the
    consensus ``multiple_choice_answer``; ``image_loader`` receives the image_id."""
    questions_path, annotations_path = Path(questions_json), Path(annotations_json)
    answers: dict[object, tuple[object, str, str]] = {}
    for i, annotation in enumerate(_list(_load_json(annotations_path), "annotations", annotations_path)):
        where = f"{annotations_path}: annotations[{i}]"
        answers[_field(annotation, "question_id", where)] = (
            _field(annotation, "image_id", where), _text(annotation, ("multiple_choice_answer",), where), where)
    groups: dict[object, _ImageExamples] = {}
    for i, question in enumerate(_list(_load_json(questions_path), "questions", questions_path)):
        where = f"{questions_path}: questions[{i}]"
        image_id, question_id = _field(question, "image_id", where), _field(question, "question_id", where)
        text = _text(question, ("question",), where)
        if question_id not in answers:
            raise InputError(f"{where}: question_id {question_id!r} has no annotation in {annotations_path}")
        answer_image, answer, answer_where = answers[question_id]
        if answer_image != image_id:
            raise InputError(f"{answer_where}: image_id {answer_image!r} does not match image_id {image_id!r} "
                             f"of question_id {question_id!r} in {questions_path}")
        group = groups.setdefault(image_id, _ImageExamples(_image_ref(question, ("image_id",), where), where, []))
        group.examples.append((f"{questions_path.name}:{question_id}", text, answer))
    return _single_image_rows(groups.values(), "vqa", "input_image_ids", tokenizer, image_loader, seed, batch_size)


def editing_rows(triplets: PathLike, tokenizer: MultimodalTokenizer, image_loader: ImageLoader,
                 seed: int = 0, batch_size: int = 32) -> Iterator[TaskRow]:
    """Text-guided editing rows from InstructPix2Pix-style triplets (JSONL or a JSON list): ``input_image``
    (or ``original_image``), ``edit_prompt`` (or ``edit``), ``edited_image``; one row per record."""
    path = Path(triplets)
    records = [(f"{path.name}:{i}", where, _image_ref(r, ("input_image", "original_image"), where),
                _text(r, ("edit_prompt", "edit"), where), _image_ref(r, ("edited_image",), where))
               for i, (where, r) in enumerate(_read_records(path))]
    for chunk in _chunks(records, max(1, batch_size // 2)):  # two images a record
        refs = [(ref, where) for _, where, source, _, edited in chunk for ref in (source, edited)]
        codes = encode_images(tokenizer, _load_images(image_loader, refs))
        for offset, (key, _, _, edit, _) in enumerate(chunk):
            yield make_row(tokenizer, "image_editing", key, seed, input_text=edit,
                           input_image_ids=codes[2 * offset], output_image_ids=codes[2 * offset + 1])


def box_text(name: str, box: tuple[float, float, float, float], left: float, top: float, side: float) -> str | None:
    """``{name} at (x1, y1) -> (x2, y2)`` for an (x0, y0, x1, y1) pixel box, in BOX_SCALE units of the
    square (left, top, side); None when nothing of the box is left inside it."""
    x1, y1, x2, y2 = (int(np.floor(np.clip((v - o) / side, 0.0, 1.0) * BOX_SCALE + 0.5))  # half rounds up
                      for v, o in zip(box, (left, top, left, top)))
    if x2 <= x1 or y2 <= y1:
        return None
    return f"{name} at ({x1}, {y1}) -> ({x2}, {y2})"


def grounded_rows(records_file: PathLike, tokenizer: MultimodalTokenizer, image_loader: ImageLoader,
                  seed: int = 0, batch_size: int = 32) -> Iterator[TaskRow]:
    """Spatially grounded generation rows from records ``{"image", "objects": [{"name", "bbox": [x, y, w, h]}]}``
    (COCO xywh pixels; JSONL or a JSON list), one per record describing all its objects. Objects
    wholly outside the centre crop are dropped, and a record left with none yields no row."""
    path = Path(records_file)
    records = []
    for i, (where, record) in enumerate(_read_records(path)):
        objects = _field(record, "objects", where)
        if not isinstance(objects, list) or not objects:
            raise InputError(f"{where}: 'objects' must be a non-empty list")
        boxes = []
        for j, item in enumerate(objects):
            at = f"{where}: objects[{j}]"
            bbox = _field(item, "bbox", at)
            if (not isinstance(bbox, list) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
                    or bbox[2] <= 0 or bbox[3] <= 0):
                raise InputError(f"{at}: 'bbox' must be [x, y, w, h] with w, h > 0, got {bbox!r}")
            x, y, w, h = bbox
            boxes.append((_text(item, ("name",), at), (x, y, x + w, y + h)))
        records.append((f"{path.name}:{i}", where, _image_ref(record, ("image",), where), boxes))
    for chunk in _chunks(records, batch_size):
        images = _load_images(image_loader, [(ref, where) for _, where, ref, _ in chunk])
        codes = encode_images(tokenizer, images)
        for (key, _, _, boxes), image, image_codes in zip(chunk, images, codes):
            crop = _centre_crop_box(*image.size)
            texts = [t for name, box in boxes if (t := box_text(name, box, *crop)) is not None]
            if texts:
                yield make_row(tokenizer, "grounded_generation", key, seed, input_text=", ".join(texts),
                               output_image_ids=image_codes)


# --- the embedded demo -------------------------------------------------------------------------------


def _demo_edit_colour(spec: shapes.ShapeSpec, seed: int, index: int) -> str:
    """Another colour for the spec's shape that keeps the (shape, colour) pair out of HELD_OUT."""
    choices = [c for c in shapes.COLOURS if c != spec.colour and (spec.shape, c) not in shapes.HELD_OUT]
    return choices[int(np.random.default_rng([seed, index]).integers(len(choices)))]


def demo_tasks(tokenizer: MultimodalTokenizer, n: int, seed: int = 0, batch_size: int = 32) -> Iterator[TaskRow]:
    """Seven rows per demo image ``spec_for(i, seed, "train")``, i < n: captioning, three VQA questions
    (colour, shape, position), text-to-image, a recolouring edit and grounded generation.

    Rendered straight from the generator (exact specs, no caption parsing); training specs never
    hold a HELD_OUT pair and edits never recolour into one.
    """
    resolution = tokenizer.vq.config.resolution
    for chunk in _chunks(range(n), batch_size):
        specs = [shapes.spec_for(i, seed, "train") for i in chunk]
        edited = [replace(s, colour=_demo_edit_colour(s, seed, i)) for i, s in zip(chunk, specs)]
        codes = encode_images(tokenizer, [shapes.render(s, resolution) for s in specs + edited])
        for offset, (index, spec, target) in enumerate(zip(chunk, specs, edited)):
            image, edited_image, key = codes[offset], codes[len(chunk) + offset], f"demo:{seed}:{index}"
            yield make_row(tokenizer, "captioning", key, seed, input_image_ids=image, output_text=spec.caption)
            for question, attribute in DEMO_QUESTIONS:
                yield make_row(tokenizer, "vqa", f"{key}:{attribute}", seed, input_text=question,
                               input_image_ids=image, output_text=getattr(spec, attribute))
            yield make_row(tokenizer, "text_to_image", key, seed, input_text=spec.caption, output_image_ids=image)
            yield make_row(tokenizer, "image_editing", key, seed, input_text=f"make the {spec.shape} {target.colour}",
                           input_image_ids=image, output_image_ids=edited_image)
            grounded = box_text(f"{spec.colour} {spec.shape}", spec.bbox, 0, 0, shapes.CANVAS)
            yield make_row(tokenizer, "grounded_generation", key, seed, input_text=grounded, output_image_ids=image)


# --- writing shards ----------------------------------------------------------------------------------


def write_task_shards(rows: Iterable[TaskRow], out_dir: PathLike, tokens_per_image: int,
                      shard_rows: int) -> list[int]:
    """Write rows as task shards of ``shard_rows`` rows; returns the shard ids written this call.

    Shard k holds rows [k * shard_rows, (k + 1) * shard_rows). Complete shards are skipped (their rows
    are still drawn from ``rows``, which must be the same sequence as before), so a killed run
    resumes where it stopped. Each shard is staged and committed parquet first, stats last.
    """
    out, schema = Path(out_dir), sft_schema(tokens_per_image)
    out.mkdir(parents=True, exist_ok=True)
    raw_shards.clear_staging(out)
    done = set(raw_shards.complete_shards(out))
    for shard_id in done:
        found = raw_shards.read_stats(out, shard_id).get("tokens_per_image")
        if found != tokens_per_image:
            raise InputError(f"{raw_shards.stats_path(out, shard_id)}: tokens_per_image is {found!r}, not "
                             f"{tokens_per_image}; write to another folder")
    written = []
    for shard_id, chunk in enumerate(_chunks(rows, shard_rows)):
        if shard_id in done:
            continue
        attempt = raw_shards.new_attempt_dir(out, shard_id)
        table = pa.Table.from_pylist([_storable(row) for row in chunk], schema=schema)
        pq.write_table(table, attempt / raw_shards.parquet_path(out, shard_id).name)
        stats = {"count": len(chunk), "tasks": dict(Counter(row["task"] for row in chunk)),
                 "tokens_per_image": tokens_per_image}
        raw_shards.write_json_atomic(attempt / raw_shards.stats_path(out, shard_id).name, stats)
        raw_shards.commit_shard(attempt, out, shard_id)
        written.append(shard_id)
    raw_shards.clear_staging(out)
    return written


def _storable(row: TaskRow) -> dict:
    """Image codes as lists, the form pyarrow's fixed-size lists take."""
    return {**row, **{column: None if row[column] is None else np.asarray(row[column]).tolist()
                      for column in ("input_image_ids", "output_image_ids")}}
