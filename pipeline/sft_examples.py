"""What the readers of published formats yield, and how those examples become SFT task rows.

A reader knows its file format and nothing of tasks or images: it yields one ``Example`` per record with the parts
the record gives (caption, question and answer, edit, object boxes) and the image references, or a ``Skipped``
for a record it leaves out on purpose. ``task_rows`` does the rest for every format alike: it takes the parts the
task needs, loads each image once per batch through the caller's loader (``cm3.pipeline.image_folder``), encodes
the batch with the VQ-GAN (``cm3.pipeline.sft_tasks.encode_images``: the project's one preprocessing) and counts
every record it cannot turn into a row under a reason (``SKIP_REASONS``) instead of failing the whole run on it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from PIL import Image

from cm3.core.errors import InputError
from cm3.core.images import centre_crop_box
from cm3.pipeline.image_folder import ImageRef, OutsideRoot
from cm3.pipeline.sft_tasks import TaskRow, box_text, encode_images, make_row
from cm3.tokenizers.multimodal import MultimodalTokenizer

ImageLoader = Callable[[ImageRef], Image.Image]
Box = tuple[float, float, float, float]  # x0, y0, x1, y1

SKIP_REASONS: dict[str, str] = {
    "missing_image": "the image file does not exist",
    "unreadable_image": "the image file could not be decoded",
    "outside_root": "the record names an image outside the --images folder (never opened)",
    "empty_text": "a text the task needs (caption, question, answer, edit) is empty",
    "no_boxes": "no object box for grounded generation (no mouse trace, or none inside the centre crop)",
    "no_image": "the record has no image (ScienceQA's text-only problems)",
    "duplicate": "a second record for an image already converted (Stanford paragraphs)",
}
TASK_TEXTS: dict[str, tuple[str, ...]] = {  # the Example fields each task turns into row text
    "captioning": ("caption",),
    "text_to_image": ("caption",),
    "vqa": ("question", "answer"),
    "image_editing": ("edit",),
    "grounded_generation": (),
}


@dataclass(frozen=True)
class Example:
    """One record's parts as its file gives them (texts stripped, maybe empty); the task picks what it needs.

    ``objects`` are (name, box) pairs for grounded generation, in pixels of the image, or in fractions of its width
    and height when ``relative`` (mouse traces); None when the record has none.
    """

    key: str
    where: str  # file and record, for messages
    images: tuple[ImageRef, ...]
    caption: str | None = None
    question: str | None = None
    answer: str | None = None
    edit: str | None = None
    objects: tuple[tuple[str, Box], ...] | None = None
    relative: bool = False


@dataclass(frozen=True)
class Skipped:
    """A record a reader leaves out, with its ``SKIP_REASONS`` key."""

    where: str
    reason: str


@dataclass
class Skips:
    """Skipped records by reason, with the first of each for the report."""

    counts: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        assert reason in SKIP_REASONS, reason
        self.counts[reason] += 1
        self.first.setdefault(reason, where)

    def summary(self) -> str:
        """``N skipped: reason count (first: where), ...``, or ``nothing skipped``."""
        if not self.counts:
            return "nothing skipped"
        parts = [f"{reason} {count} (first: {self.first[reason]})" for reason, count in sorted(self.counts.items())]
        return f"{sum(self.counts.values())} skipped: " + ", ".join(parts)


def load_image(loader: ImageLoader, ref: ImageRef) -> Image.Image | str:
    """The image, or the ``SKIP_REASONS`` key of why it cannot be had. ``InputError`` (a wrong --image-pattern)
    still stops the run: no record can fix it."""
    try:
        image = loader(ref)
    except InputError:
        raise
    except OutsideRoot:
        return "outside_root"
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return "missing_image"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return "unreadable_image"
    if not isinstance(image, Image.Image):
        raise TypeError(f"the image loader returned {type(image).__name__} for {ref!r}, not a PIL image")
    return image


def task_rows(task: str, items: Iterable[Example | Skipped], tokenizer: MultimodalTokenizer, loader: ImageLoader,
              skips: Skips, seed: int = 0, batch_size: int = 32) -> Iterator[TaskRow]:
    """Rows of ``task`` from a reader's items, in their order; records that cannot be rows go to ``skips``.

    Items are taken in batches of at most ``batch_size`` distinct images; an image named by several records of
    a batch (a reader yields a COCO image's captions together) is loaded and encoded once.
    """
    if task not in TASK_TEXTS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASK_TEXTS)}")
    batch: list[Example] = []
    refs: set[ImageRef] = set()
    for item in items:
        if isinstance(item, Skipped):
            skips.add(item.reason, item.where)
            continue
        if any(not getattr(item, name) for name in TASK_TEXTS[task]):
            skips.add("empty_text", item.where)
            continue
        if task == "grounded_generation" and not item.objects:
            skips.add("no_boxes", item.where)
            continue
        new = set(item.images) - refs
        if batch and len(refs | new) > batch_size:
            yield from _batch_rows(task, batch, tokenizer, loader, skips, seed)
            batch, refs = [], set()
        batch.append(item)
        refs |= set(item.images)
    if batch:
        yield from _batch_rows(task, batch, tokenizer, loader, skips, seed)


def _batch_rows(task: str, batch: list[Example], tokenizer: MultimodalTokenizer, loader: ImageLoader,
                skips: Skips, seed: int) -> Iterator[TaskRow]:
    loaded = {ref: load_image(loader, ref) for ref in dict.fromkeys(ref for e in batch for ref in e.images)}
    images = {ref: image for ref, image in loaded.items() if not isinstance(image, str)}
    codes = dict(zip(images, encode_images(tokenizer, list(images.values())))) if images else {}
    for example in batch:
        failed = [(ref, loaded[ref]) for ref in example.images if ref not in images]
        if failed:
            ref, reason = failed[0]
            skips.add(reason, f"{example.where}: image {ref!r}")
            continue
        first = codes[example.images[0]]
        if task == "captioning":
            yield make_row(tokenizer, task, example.key, seed, input_image_ids=first, output_text=example.caption)
        elif task == "text_to_image":
            yield make_row(tokenizer, task, example.key, seed, input_text=example.caption, output_image_ids=first)
        elif task == "vqa":
            yield make_row(tokenizer, task, example.key, seed, input_text=example.question, input_image_ids=first,
                           output_text=example.answer)
        elif task == "image_editing":
            yield make_row(tokenizer, task, example.key, seed, input_text=example.edit, input_image_ids=first,
                           output_image_ids=codes[example.images[1]])
        else:
            text = _grounded_text(example, images[example.images[0]], tokenizer.vq.config.resolution)
            if text is None:
                skips.add("no_boxes", example.where)
                continue
            yield make_row(tokenizer, task, example.key, seed, input_text=text, output_image_ids=first)


def _grounded_text(example: Example, image: Image.Image, resolution: int) -> str | None:
    """The objects as ``name at (x1, y1) -> (x2, y2)`` in the centre crop's units; None when none is left in it."""
    width, height = image.size
    crop = centre_crop_box(width, height, resolution)
    scale = (width, height, width, height) if example.relative else (1, 1, 1, 1)
    texts = [text for name, box in example.objects
             if (text := box_text(name, tuple(v * s for v, s in zip(box, scale)), *crop)) is not None]
    return ", ".join(texts) or None
