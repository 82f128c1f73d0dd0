"""COCO captions files (``captions_train2017.json``): captioning and text-to-image, one example per caption."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cm3.core.errors import InputError
from cm3.pipeline.image_folder import ImageRef
from cm3.pipeline.sft_examples import Example
from cm3.pipeline.sft_readers import Format, Sources
from cm3.pipeline.sft_readers._records import field, image_ref, json_items, record_dict, text

EXPECTED = "a COCO captions file: an object with lists 'images' and 'annotations'"


def image_files(path: Path) -> dict[object, ImageRef]:
    """image id -> file_name of a COCO file's ``images`` (its captions file, and `cm3 eval caption`'s references)."""
    files: dict[object, ImageRef] = {}
    for i, image in enumerate(json_items(path, "images.item", EXPECTED)):
        where = f"{path}: images[{i}]"
        files[field(record_dict(image, where), "id", where)] = image_ref(image, "file_name", where)
    return files


def examples(sources: Sources, task: str) -> Iterator[Example]:
    """One example per annotation (``images``: id, file_name; ``annotations``: image_id, id, caption), an image's
    captions together so that it is loaded once; the image reference is the file_name."""
    path = sources.source
    files = image_files(path)
    by_image: dict[object, list[Example]] = {}
    for i, annotation in enumerate(json_items(path, "annotations.item", EXPECTED)):
        where = f"{path}: annotations[{i}]"
        image_id = field(record_dict(annotation, where), "image_id", where)
        if image_id not in files:
            raise InputError(f"{where}: image_id {image_id!r} is not in the file's images")
        by_image.setdefault(image_id, []).append(Example(
            f"{path.name}:{field(annotation, 'id', where)}", where, (files[image_id],),
            caption=text(annotation, "caption", where)))
    for group in by_image.values():
        yield from group


FORMATS = {"coco": Format(examples, ("captioning", "text_to_image"), "a COCO captions JSON (captions_*.json)")}
