"""Grounded records ``{"image", "objects": [{"name", "bbox": [x, y, w, h]}]}`` (JSONL or a JSON list): spatially
grounded generation rows, one per record describing all its objects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cm3.core.errors import InputError
from cm3.core.files import PathLike
from cm3.core.images import centre_crop_box
from cm3.pipeline.sft_readers import Reader
from cm3.pipeline.sft_readers._records import field, image_ref, read_records, text_field
from cm3.pipeline.sft_tasks import ImageLoader, TaskRow, box_text, chunks, encode_images, load_images, make_row
from cm3.tokenizers.multimodal import MultimodalTokenizer


def grounded_rows(records_file: PathLike, tokenizer: MultimodalTokenizer, image_loader: ImageLoader,
                  seed: int = 0, batch_size: int = 32) -> Iterator[TaskRow]:
    """Spatially grounded generation rows from records ``{"image", "objects": [{"name", "bbox": [x, y, w, h]}]}``
    (COCO xywh pixels; JSONL or a JSON list), one per record describing all its objects. Objects
    wholly outside the centre crop are dropped, and a record left with none yields no row."""
    path = Path(records_file)
    records = []
    for i, (where, record) in enumerate(read_records(path)):
        objects = field(record, "objects", where)
        if not isinstance(objects, list) or not objects:
            raise InputError(f"{where}: 'objects' must be a non-empty list")
        boxes = []
        for j, item in enumerate(objects):
            at = f"{where}: objects[{j}]"
            bbox = field(item, "bbox", at)
            if (not isinstance(bbox, list) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
                    or bbox[2] <= 0 or bbox[3] <= 0):
                raise InputError(f"{at}: 'bbox' must be [x, y, w, h] with w, h > 0, got {bbox!r}")
            x, y, w, h = bbox
            boxes.append((text_field(item, ("name",), at), (x, y, x + w, y + h)))
        records.append((f"{path.name}:{i}", where, image_ref(record, ("image",), where), boxes))
    for chunk in chunks(records, batch_size):
        images = load_images(image_loader, [(ref, where) for _, where, ref, _ in chunk])
        codes = encode_images(tokenizer, images)
        for (key, _, _, boxes), image, image_codes in zip(chunk, images, codes):
            crop = centre_crop_box(*image.size, tokenizer.vq.config.resolution)
            texts = [t for name, box in boxes if (t := box_text(name, box, *crop)) is not None]
            if texts:
                yield make_row(tokenizer, "grounded_generation", key, seed, input_text=", ".join(texts),
                               output_image_ids=image_codes)


READERS = {"grounded_generation": Reader(grounded_rows, "grounded records (JSONL or a JSON list)")}
