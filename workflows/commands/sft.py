"""Commands that build instruction-tuning task shards."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cm3.workflows.commands.common import fail


def sft_convert(
    task: str = typer.Option(..., help="The reader of the source's format: captioning or text_to_image (COCO captions), "
                                       "vqa (VQA2), image_editing (InstructPix2Pix), grounded_generation, or any other "
                                       "module of cm3/pipeline/sft_readers/."),
    source: Path = typer.Option(..., help="COCO captions JSON, VQA2 questions JSON, InstructPix2Pix JSONL or grounded records."),
    images: Path = typer.Option(..., help="Folder the records' image names (or ids) are resolved in."),
    tokenizer: Path = typer.Option(..., help="Tokenizer folder (cm3 tokenizer build)."),
    out: Path = typer.Option(..., help="Folder for the task shards."),
    annotations: Optional[Path] = typer.Option(None, help="VQA2 annotations JSON (vqa only)."),
    image_pattern: str = typer.Option("{}", help="How an image id or name becomes a file name, e.g. COCO_val2014_{:012d}.jpg."),
    shard_rows: int = typer.Option(10_000, min=1, help="Rows per task shard."),
    seed: int = typer.Option(0, help="Seed of the instruction-template choice."),
) -> None:
    """Convert a public data set's files into SFT task shards (instruction templates, the paper's layouts).

    Examples:

      cm3 sft convert --task captioning --source captions_train2017.json --images coco/train2017 --tokenizer tok/ --out sft/coco

      cm3 sft convert --task vqa --source v2_Questions.json --annotations v2_Annotations.json --images coco/val2014 --image-pattern COCO_val2014_{:012d}.jpg --tokenizer tok/ --out sft/vqa
    """
    from PIL import Image

    from cm3.pipeline.sft_readers import readers
    from cm3.pipeline.sft_tasks import write_task_shards
    from cm3.tokenizers.multimodal import MultimodalTokenizer

    known = readers()
    if task not in known:
        fail(f"--task {task!r}: expected one of {', '.join(known)}")
    reader = known[task]
    if reader.annotations is not None and annotations is None:
        fail(f"--task {task} needs --annotations ({reader.annotations})")

    def load(ref) -> Image.Image:
        with Image.open(images / image_pattern.format(ref)) as image:
            return image.copy()  # as read: cm3.core.images crops, resizes and mattes it as ingest does

    try:
        multimodal = MultimodalTokenizer.load(tokenizer)
        rows = reader.rows(source, multimodal, load, seed, annotations)
        written = write_task_shards(rows, out, multimodal.tokens_per_image, shard_rows)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(f"{out}: {len(written)} task shard(s) written")


def sft_demo(
    tokenizer: Path = typer.Option(..., help="Tokenizer folder (cm3 tokenizer build)."),
    out: Path = typer.Option(..., help="Folder for the task shards."),
    n: int = typer.Option(1000, min=1, help="Demo images; each yields 7 rows (captioning, 3 VQA, text-to-image, edit, grounding)."),
    seed: int = typer.Option(0, help="Generator seed (held-out shape/colour pairs never appear)."),
    shard_rows: int = typer.Option(1000, min=1, help="Rows per task shard."),
) -> None:
    """SFT task shards from the embedded demo data: every task, from the generator's own geometry.

    Example:

      cm3 sft demo --tokenizer runs/demo/tokenizer --out runs/demo/sft --n 500
    """
    from cm3.pipeline.sft_tasks import write_task_shards
    from cm3.synthetic.sft_tasks import demo_tasks
    from cm3.tokenizers.multimodal import MultimodalTokenizer

    try:
        multimodal = MultimodalTokenizer.load(tokenizer)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    written = write_task_shards(demo_tasks(multimodal, n, seed), out, multimodal.tokens_per_image, shard_rows)
    typer.echo(f"{out}: {len(written)} task shard(s) written ({7 * n} rows)")
