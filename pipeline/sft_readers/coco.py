"""COCO captions files (``images``: id, file_name; ``annotations``: image_id, id, caption): captioning and
text-to-image rows, one per annotation."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from cm3.core.errors import InputError
from cm3.core.files import PathLike
from cm3.pipeline.sft_readers import Reader
from cm3.pipeline.sft_readers._records import (ImageExamples, field, image_ref, json_list, load_json,
                                               single_image_rows, text_field)
from cm3.pipeline.sft_tasks import ImageLoader, ImageRef, TaskRow
from cm3.tokenizers.multimodal import MultimodalTokenizer


def _coco_captions(path: Path) -> list[tuple[ImageRef, str, list[tuple[str, str]]]]:
    """(file_name, where, [(key, caption)]) per annotated image of a COCO captions file."""
    data = load_json(path)
    files: dict[object, tuple[ImageRef, str]] = {}
    for i, image in enumerate(json_list(data, "images", path)):
        where = f"{path}: images[{i}]"
        files[field(image, "id", where)] = (image_ref(image, ("file_name",), where), where)
    captions: dict[object, list[tuple[str, str]]] = {}
    for i, annotation in enumerate(json_list(data, "annotations", path)):
        where = f"{path}: annotations[{i}]"
        image_id = field(annotation, "image_id", where)
        if image_id not in files:
            raise InputError(f"{where}: image_id {image_id!r} is not in the file's images")
        key = f"{path.name}:{field(annotation, 'id', where)}"
        captions.setdefault(image_id, []).append((key, text_field(annotation, ("caption",), where)))
    return [(*files[image_id], pairs) for image_id, pairs in captions.items()]


def captioning_rows(coco_json: PathLike, tokenizer: MultimodalTokenizer, image_loader: ImageLoader,
                    seed: int = 0, batch_size: int = 32) -> Iterator[TaskRow]:
    """Captioning rows from a COCO captions file (``images``: id, file_name; ``annotations``: image_id,
    id, caption), one per annotation; ``image_loader`` receives the file_name."""
    path = Path(coco_json)
    groups = [ImageExamples(ref, where, [(key, None, caption) for key, caption in pairs])
              for ref, where, pairs in _coco_captions(path)]
    return single_image_rows(groups, "captioning", "input_image_ids", tokenizer, image_loader, seed, batch_size)


def text_to_image_rows(source: PathLike | Iterable[tuple[ImageRef, str]], tokenizer: MultimodalTokenizer,
                       image_loader: ImageLoader, seed: int = 0, batch_size: int = 32) -> Iterator[TaskRow]:
    """Text-to-image rows from a COCO captions file (as `captioning_rows`) or from (image, caption) pairs."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        groups = [ImageExamples(ref, where, [(key, caption, None) for key, caption in pairs])
                  for ref, where, pairs in _coco_captions(path)]
    else:
        by_image: dict[ImageRef, ImageExamples] = {}
        for i, pair in enumerate(source):
            where = f"pairs[{i}]"
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InputError(f"{where}: expected an (image, caption) pair")
            ref = image_ref({"image": pair[0]}, ("image",), where)
            caption = text_field({"caption": pair[1]}, ("caption",), where)
            by_image.setdefault(ref, ImageExamples(ref, where, [])).examples.append((f"pair:{i}", caption, None))
        groups = list(by_image.values())
    return single_image_rows(groups, "text_to_image", "output_image_ids", tokenizer, image_loader, seed, batch_size)


READERS = {"captioning": Reader(captioning_rows, "a COCO captions JSON"),
           "text_to_image": Reader(text_to_image_rows, "a COCO captions JSON")}
