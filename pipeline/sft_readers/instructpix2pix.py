"""InstructPix2Pix-style triplets (JSONL or a JSON list): text-guided image editing, one example per record."""

from __future__ import annotations

from collections.abc import Iterator

from cm3.pipeline.sft_examples import Example
from cm3.pipeline.sft_readers import Format, Sources
from cm3.pipeline.sft_readers._records import image_ref, records, text


def examples(sources: Sources, task: str) -> Iterator[Example]:
    """``input_image`` (or ``original_image``), ``edit_prompt`` (or ``edit``), ``edited_image`` of each record."""
    path = sources.source
    for i, (where, record) in enumerate(records(path)):
        source = image_ref(record, ("input_image", "original_image"), where)
        edit = text(record, ("edit_prompt", "edit"), where)
        yield Example(f"{path.name}:{i}", where, (source, image_ref(record, "edited_image", where)), edit=edit)


FORMATS = {"instructpix2pix": Format(examples, ("image_editing",),
                                     "InstructPix2Pix-style triplets (JSONL or a JSON list)")}
