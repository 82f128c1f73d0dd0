"""Grounded records ``{"image", "objects": [{"name", "bbox": [x, y, w, h]}]}`` (JSONL or a JSON list): spatially
grounded generation, one example per record describing all its objects."""

from __future__ import annotations

from collections.abc import Iterator

from cm3.core.errors import InputError
from cm3.pipeline.sft_examples import Example
from cm3.pipeline.sft_readers import Format, Sources
from cm3.pipeline.sft_readers._records import field, image_ref, items_list, record_dict, records, text


def examples(sources: Sources, task: str) -> Iterator[Example]:
    """Boxes in COCO's xywh pixels; objects wholly outside the centre crop are dropped when the rows are made."""
    path = sources.source
    for i, (where, record) in enumerate(records(path)):
        objects = []
        for j, item in enumerate(items_list(record, "objects", where)):
            at = f"{where}: objects[{j}]"
            bbox = field(record_dict(item, at), "bbox", at)
            if (not isinstance(bbox, list) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
                    or bbox[2] <= 0 or bbox[3] <= 0):
                raise InputError(f"{at}: 'bbox' must be [x, y, w, h] with w, h > 0, got {bbox!r}")
            name = text(item, "name", at)
            if not name:
                raise InputError(f"{at}: 'name' is empty")
            x, y, w, h = bbox
            objects.append((name, (x, y, x + w, y + h)))
        yield Example(f"{path.name}:{i}", where, (image_ref(record, "image", where),), objects=tuple(objects))


FORMATS = {"grounded": Format(examples, ("grounded_generation",), "grounded records (JSONL or a JSON list)")}
