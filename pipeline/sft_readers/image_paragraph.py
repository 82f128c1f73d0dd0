"""Stanford image paragraphs (Krause et al. 2017): ``paragraphs_v1.json``, with ``train_split.json``,
``val_split.json`` or ``test_split.json`` to keep one split; paragraph captioning (and text-to-image).

``paragraphs_v1.json`` is a list of ``{"url", "image_id", "paragraph"}`` over Visual Genome images; a split file
is a list of image ids. Some images have two paragraphs: the first is kept, as the authors' preprocessing does,
the second counted as ``duplicate``. The image reference is the url's last two parts (``VG_100K_2/2388350.jpg``),
so ``--images`` is the folder that holds Visual Genome's ``VG_100K`` and ``VG_100K_2``.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlparse

from cm3.core.errors import InputError
from cm3.pipeline.sft_examples import Example, Skipped
from cm3.pipeline.sft_readers import Format, Sources
from cm3.pipeline.sft_readers._records import field, json_items, load_json, record_dict, text

PARAGRAPHS = "Stanford's paragraphs_v1.json: a list of {url, image_id, paragraph}"
SPLIT_FILE = "a split file: a JSON list of Visual Genome image ids"


def examples(sources: Sources, task: str) -> Iterator[Example | Skipped]:
    path = sources.source
    wanted = split_ids(sources) if sources.splits is not None else None
    seen: set[int] = set()
    for i, record in enumerate(json_items(path, "item", PARAGRAPHS)):
        where = f"{path}: record {i}"
        image_id = field(record_dict(record, where), "image_id", where)
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise InputError(f"{where}: 'image_id' must be an integer, got {image_id!r}")
        url_path = urlparse(text(record, "url", where)).path
        if not url_path.endswith(".jpg"):
            raise InputError(f"{where}: 'url' must name a Visual Genome .jpg, got {record['url']!r}")
        paragraph = text(record, "paragraph", where)
        duplicate = image_id in seen
        seen.add(image_id)
        if wanted is not None and image_id not in wanted:
            continue
        if duplicate:
            yield Skipped(where, "duplicate")
            continue
        ref = "/".join(url_path.strip("/").split("/")[-2:])
        yield Example(f"{path.name}:{image_id}", where, (ref,), caption=paragraph)
    unknown = [(j, image_id) for j, image_id in enumerate(wanted or ()) if image_id not in seen]
    if unknown:
        j, image_id = unknown[0]
        raise InputError(f"{sources.splits}: [{j}]: image id {image_id!r} is not in {path} "
                         f"({len(unknown)} such ids)")


def split_ids(sources: Sources) -> dict[int, None]:
    """The split file's image ids, in its order."""
    ids = load_json(sources.splits, SPLIT_FILE)
    if not isinstance(ids, list):
        raise InputError(f"{sources.splits}: expected {SPLIT_FILE}")
    for j, image_id in enumerate(ids):
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise InputError(f"{sources.splits}: [{j}]: expected an integer image id, got {image_id!r}")
    return dict.fromkeys(ids)


FORMATS = {"image-paragraph": Format(examples, ("captioning", "text_to_image"),
                                     "Stanford's paragraphs_v1.json",
                                     splits="train_split.json, val_split.json or test_split.json (optional)")}
