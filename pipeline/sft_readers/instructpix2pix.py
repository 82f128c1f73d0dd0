"""InstructPix2Pix-style triplets (JSONL or a JSON list): text-guided image editing rows, one per record."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cm3.core.files import PathLike
from cm3.pipeline.sft_readers import Reader
from cm3.pipeline.sft_readers._records import image_ref, read_records, text_field
from cm3.pipeline.sft_tasks import ImageLoader, TaskRow, chunks, encode_images, load_images, make_row
from cm3.tokenizers.multimodal import MultimodalTokenizer


def editing_rows(triplets: PathLike, tokenizer: MultimodalTokenizer, image_loader: ImageLoader,
                 seed: int = 0, batch_size: int = 32) -> Iterator[TaskRow]:
    """Text-guided editing rows from InstructPix2Pix-style triplets (JSONL or a JSON list): ``input_image``
    (or ``original_image``), ``edit_prompt`` (or ``edit``), ``edited_image``; one row per record."""
    path = Path(triplets)
    records = [(f"{path.name}:{i}", where, image_ref(r, ("input_image", "original_image"), where),
                text_field(r, ("edit_prompt", "edit"), where), image_ref(r, ("edited_image",), where))
               for i, (where, r) in enumerate(read_records(path))]
    for chunk in chunks(records, max(1, batch_size // 2)):  # two images a record
        refs = [(ref, where) for _, where, source, _, edited in chunk for ref in (source, edited)]
        codes = encode_images(tokenizer, load_images(image_loader, refs))
        for offset, (key, _, _, edit, _) in enumerate(chunk):
            yield make_row(tokenizer, "image_editing", key, seed, input_text=edit,
                           input_image_ids=codes[2 * offset], output_image_ids=codes[2 * offset + 1])


READERS = {"image_editing": Reader(editing_rows, "InstructPix2Pix-style triplets (JSONL or a JSON list)")}
