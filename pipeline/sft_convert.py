"""``cm3 sft convert`` as a function: a published data set's files to SFT task shards.

Two passes over the files. The first reads every record and checks it, and every image name against
``--image-pattern``, without opening an image: a malformed file stops the run there, before the output folder is
created, so a failed run leaves nothing a later run would trust. The second makes the rows (``task_rows``) and
writes them (``write_task_shards``, which resumes a killed run at its first incomplete shard).
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from cm3.core.files import PathLike
from cm3.pipeline.image_folder import ImageFolder, OutsideRoot
from cm3.pipeline.sft_examples import Example, Skips, task_rows
from cm3.pipeline.sft_readers import Format, Sources
from cm3.pipeline.sft_tasks import write_task_shards
from cm3.tokenizers.multimodal import MultimodalTokenizer


@dataclass(frozen=True)
class Conversion:
    """What a conversion did: shards written this run, rows in all the shards, records skipped by reason."""

    written: list[int]
    rows: int
    skips: Skips


def convert(name: str, fmt: Format, task: str, sources: Sources, images: ImageFolder,
            tokenizer: MultimodalTokenizer, out: PathLike, shard_rows: int = 10_000, seed: int = 0,
            batch_size: int = 32, tokenizer_identity: dict | None = None) -> Conversion:
    """Check ``sources`` whole, then write the ``task`` rows of format ``fmt`` (called ``name``) to ``out``
    (``tokenizer_identity``: see ``write_task_shards``)."""
    for item in fmt.read(name, task, sources):
        if isinstance(item, Example):
            for ref in item.images:
                with suppress(OutsideRoot, FileNotFoundError):  # counted, not fatal: the second pass skips it
                    images.locate(ref)
    skips, count = Skips(), 0

    def counted():
        nonlocal count
        for row in task_rows(task, fmt.read(name, task, sources), tokenizer, images, skips, seed, batch_size):
            count += 1
            yield row

    written = write_task_shards(counted(), Path(out), tokenizer.tokens_per_image, shard_rows, tokenizer_identity)
    return Conversion(written, count, skips)
