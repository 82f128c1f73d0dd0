"""Instruction-tuning (SFT) task rows and task shards: CM3Leon's stage-2 data.

CM3Leon's SFT concatenates instruction and answer into one document and trains it with the same
CM3 objective as pretraining, so an SFT example is one more joint-id sequence. Rows keep their
parts next to the sequence so that data can be inspected, filtered by task or laid out again
without decoding and re-encoding images. The readers of published formats (``cm3.pipeline.sft_readers``, through
``cm3.pipeline.sft_examples``) and the demo's tasks (``cm3.synthetic.sft_tasks``) turn records into rows with
``make_row``.

Shard format: ``DIR/NNNNN.parquet`` (one row per example) and ``DIR/NNNNN_stats.json``
(``{"count", "tasks": {task: rows}, "tokens_per_image"}``); a shard is complete once its stats
file exists, which is written last (the commit rule of ``cm3.core.shards``). Columns
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
    ids               list<int32> not null  the joint-id sequence: what the model trains on

``ids`` is laid out by ``cm3.tokenizers.layout.task_example`` (its docstring shows every task's layout); the
answer is BPE-encoded apart from the instruction with a leading space, so the text part decodes to
``instruction + " " + answer``, and the editing layout's source prompt is ``EDIT_SOURCE_PROMPTS[template]``.
Grounded boxes read ``{name} at (x1, y1) -> (x2, y2)`` with integer coordinates 0..100 relative to the square
the image is centre-cropped to (resolution-independent and a small set of number tokens); several objects are
joined by ", ".

Every image (real or demo) goes through ``cm3.core.images.square_pixels``: the centre crop and resize of ingest.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import TypedDict, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cm3.core.errors import InputError
from cm3.core.files import PathLike, write_json
from cm3.core.images import pixels_to_tensor, square_pixels
from cm3.core.shards import (clear_staging, commit_shard, complete_shards, new_attempt_dir, parquet_path, read_stats,
                             stats_path)
from cm3.tokenizers.layout import task_example
from cm3.tokenizers.multimodal import MultimodalTokenizer

TEMPLATES: dict[str, tuple[str, ...]] = {
    "captioning": ("describe the image.", "write a caption for this image.", "what does this picture show?"),
    "vqa": ("{text}", "question: {text} answer:", "answer the question about the image. {text}"),
    "text_to_image": ("{text}", "generate an image of {text}.", "draw: {text}"),
    "image_editing": ("{text}", "edit the image: {text}", "now {text}"),
    "grounded_generation": ("{text}", "generate an image with {text}.", "an image showing {text}"),
}
# instruction1 of the two-image editing layout, one per editing template: it names the input image.
EDIT_SOURCE_PROMPTS: tuple[str, ...] = ("the original image", "here is an image.", "input image:")
BOX_SCALE = 100  # grounded coordinates are integers in [0, BOX_SCALE], rounded half up


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


# --- rows ----------------------------------------------------------------------------------------------


def layout_example(tokenizer: MultimodalTokenizer, row: TaskRow) -> list[int]:
    """The joint-id sequence of one row, in the layout of its task (``cm3.tokenizers.layout.task_example``)."""
    task = row["task"]
    answer, source = [], []
    if task in ("captioning", "vqa"):
        if not row.get("output_text"):
            raise ValueError(f"{task} row {row.get('key')!r}: output_text is empty")
        answer = tokenizer.encode_caption(" " + row["output_text"])
    elif task == "image_editing":
        source = tokenizer.encode_caption(EDIT_SOURCE_PROMPTS[row["template"]])
    try:
        return task_example(tokenizer.vocab, task, tokenizer.encode_caption(row["instruction"]),
                            tokenizer.tokens_per_image, answer_ids=answer, source_ids=source,
                            input_image_ids=row.get("input_image_ids"), output_image_ids=row.get("output_image_ids"))
    except ValueError as err:
        raise ValueError(f"{task} row {row.get('key')!r}: {err}") from err


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


# --- images, in batches -------------------------------------------------------------------------------

T = TypeVar("T")


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of ``size`` items (the last one shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def encode_images(tokenizer: MultimodalTokenizer, images: Sequence[Image.Image]) -> np.ndarray:
    """VQ codes int16 [B, N] of images of any size, in one batch (``square_pixels``: ingest's crop and resize)."""
    resolution = tokenizer.vq.config.resolution
    pixels = pixels_to_tensor(np.stack([square_pixels(image, resolution) for image in images]))
    device = next(tokenizer.vq.parameters()).device
    return tokenizer.vq.encode(pixels.to(device)).reshape(len(images), -1).cpu().numpy().astype(np.int16)


def box_text(name: str, box: tuple[float, float, float, float], left: float, top: float, side: float) -> str | None:
    """``{name} at (x1, y1) -> (x2, y2)`` for an (x0, y0, x1, y1) pixel box, in BOX_SCALE units of the
    square (left, top, side); None when nothing of the box is left inside it."""
    x1, y1, x2, y2 = (int(np.floor(np.clip((v - o) / side, 0.0, 1.0) * BOX_SCALE + 0.5))  # half rounds up
                      for v, o in zip(box, (left, top, left, top)))
    if x2 <= x1 or y2 <= y1:
        return None
    return f"{name} at ({x1}, {y1}) -> ({x2}, {y2})"


# --- writing shards ------------------------------------------------------------------------------------


def write_task_shards(rows: Iterable[TaskRow], out_dir: PathLike, tokens_per_image: int,
                      shard_rows: int, tokenizer_identity: dict | None = None) -> list[int]:
    """Write rows as task shards of ``shard_rows`` rows; returns the shard ids written this call.

    ``tokenizer_identity`` (``tokenizer_sha256`` and ``tokenizer_content_sha256`` of the tokenizer folder) goes
    into every shard's stats, so `cm3 train` can refuse the shards with another tokenizer; a folder whose shards
    record another one is refused here.

    Shard k holds rows [k * shard_rows, (k + 1) * shard_rows). Complete shards are skipped (their rows
    are still drawn from ``rows``, which must be the same sequence as before), so a killed run
    resumes where it stopped. Each shard is staged and committed parquet first, stats last.
    """
    out, schema = Path(out_dir), sft_schema(tokens_per_image)
    out.mkdir(parents=True, exist_ok=True)
    clear_staging(out)
    done = set(complete_shards(out))
    for shard_id in done:
        stats = read_stats(out, shard_id)
        found = stats.get("tokens_per_image")
        if found != tokens_per_image:
            raise InputError(f"{stats_path(out, shard_id)}: tokens_per_image is {found!r}, not "
                             f"{tokens_per_image}; write to another folder")
        recorded = stats.get("tokenizer_sha256")
        if tokenizer_identity and recorded and recorded != tokenizer_identity.get("tokenizer_sha256"):
            raise InputError(f"{stats_path(out, shard_id)}: made with tokenizer {str(recorded)[:12]}, not "
                             f"{tokenizer_identity['tokenizer_sha256'][:12]}; write to another folder")
    written = []
    for shard_id, chunk in enumerate(chunks(rows, shard_rows)):
        if shard_id in done:
            continue
        attempt = new_attempt_dir(out, shard_id)
        table = pa.Table.from_pylist([_storable(row) for row in chunk], schema=schema)
        pq.write_table(table, attempt / parquet_path(out, shard_id).name)
        stats = {"count": len(chunk), "tasks": dict(Counter(row["task"] for row in chunk)),
                 "tokens_per_image": tokens_per_image, **(tokenizer_identity or {})}
        write_json(attempt / stats_path(out, shard_id).name, stats)
        commit_shard(attempt, out, shard_id)
        written.append(shard_id)
    clear_staging(out)
    return written


def _storable(row: TaskRow) -> dict:
    """Image codes as lists, the form pyarrow's fixed-size lists take."""
    return {**row, **{column: None if row[column] is None else np.asarray(row[column]).tolist()
                      for column in ("input_image_ids", "output_image_ids")}}
