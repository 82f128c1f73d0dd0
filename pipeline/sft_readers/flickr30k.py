"""Flickr30k captions: Karpathy's split file (``dataset_flickr30k.json``) or the original
``results_20130124.token``; captioning and text-to-image, one example per caption.

Karpathy's file is ``{"images": [{"filename", "imgid", "split", "sentids", "sentences": [{"raw", "tokens",
"imgid", "sentid"}]}], "dataset": "flickr30k"}``; ``--split`` keeps one of its splits. The token file has one
caption a line, ``<file name>#<0-4><TAB><caption>``, and no splits. Either way the image reference is the file
name (``1000092795.jpg``), found in the ``flickr30k-images`` folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cm3.core.errors import InputError
from cm3.pipeline.sft_examples import Example
from cm3.pipeline.sft_readers import Format, Sources
from cm3.pipeline.sft_readers._records import field, image_ref, items_list, json_items, record_dict, text, text_lines

KARPATHY = "Karpathy's split file: an object with a list 'images'"
KARPATHY_SPLITS = ("train", "val", "test", "restval")


def examples(sources: Sources, task: str) -> Iterator[Example]:
    if sources.source.suffix == ".json":
        return karpathy_examples(sources.source, sources.split)
    if sources.split is not None:
        raise InputError(f"{sources.source}: the token file has no splits; --split needs Karpathy's "
                         f"dataset_flickr30k.json")
    return token_examples(sources.source)


def karpathy_examples(path: Path, split: str | None) -> Iterator[Example]:
    if split is not None and split not in KARPATHY_SPLITS:
        raise InputError(f"--split {split!r}: Karpathy's splits are {', '.join(KARPATHY_SPLITS)}")
    for i, image in enumerate(json_items(path, "images.item", KARPATHY)):
        where = f"{path}: images[{i}]"
        ref = image_ref(record_dict(image, where), "filename", where)
        image_split = text(image, "split", where)
        if image_split not in KARPATHY_SPLITS:
            raise InputError(f"{where}: 'split' is {image_split!r}, expected one of {', '.join(KARPATHY_SPLITS)}")
        sentences = [(j, record_dict(s, f"{where}: sentences[{j}]"))
                     for j, s in enumerate(items_list(image, "sentences", where))]
        if split is not None and image_split != split:
            continue
        for j, sentence in sentences:
            at = f"{where}: sentences[{j}]"
            yield Example(f"{path.name}:{field(sentence, 'sentid', at)}", at, (ref,), caption=text(sentence, "raw", at))


def token_examples(path: Path) -> Iterator[Example]:
    for number, line in text_lines(path):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        name, tab, caption = line.partition("\t")
        image, hash_, index = name.rpartition("#")
        if not tab or not hash_ or not image or not index.isdigit():
            raise InputError(f"{where}: expected '<image file>#<n><TAB><caption>', got {line[:80]!r}")
        yield Example(f"{path.name}:{name}", where, (image,), caption=caption.strip())


FORMATS = {"flickr30k": Format(examples, ("captioning", "text_to_image"),
                               "dataset_flickr30k.json (Karpathy's splits) or results_20130124.token",
                               split="one of Karpathy's splits: train, val, test (dataset_flickr30k.json only)")}
