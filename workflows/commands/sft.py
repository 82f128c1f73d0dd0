"""Commands that build instruction-tuning task shards."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cm3.workflows.commands.common import fail


def sft_convert(
    task: str = typer.Option(..., help="The task the rows are for: captioning, text_to_image, vqa, image_editing or "
                                       "grounded_generation."),
    source: Path = typer.Option(..., help="The data set's file: see --format and docs/datasets.md."),
    images: Path = typer.Option(..., help="Folder the records' image names (or ids) are found in; names that leave "
                                          "it are skipped, never opened."),
    tokenizer: Path = typer.Option(..., help="Tokenizer folder (cm3 tokenizer build)."),
    out: Path = typer.Option(..., help="Folder for the task shards."),
    fmt: Optional[str] = typer.Option(
        None, "--format", help="The source's published format: coco, vqa2, instructpix2pix, grounded, flickr30k, "
                               "image-paragraph, localized-narratives, vizwiz, okvqa, scienceqa (any module of "
                               "cm3/pipeline/sft_readers/). Default: the task's first reader (coco, vqa2, "
                               "instructpix2pix, grounded)."),
    annotations: Optional[Path] = typer.Option(None, help="The annotations JSON of vqa2 and okvqa."),
    splits: Optional[Path] = typer.Option(None, help="A split file: image-paragraph's train_split.json (etc.) or "
                                                     "ScienceQA's pid_splits.json."),
    split: Optional[str] = typer.Option(None, help="A split's name: flickr30k's Karpathy split or a ScienceQA split."),
    image_pattern: str = typer.Option("{}", help="How an image id or name becomes a file name, e.g. "
                                                 "COCO_val2014_{:012d}.jpg."),
    shard_rows: int = typer.Option(10_000, min=1, help="Rows per task shard."),
    seed: int = typer.Option(0, help="Seed of the instruction-template choice."),
) -> None:
    """Convert a public data set's files into SFT task shards (instruction templates, the paper's layouts).

    The files are checked whole before anything is written (a malformed file: exit 2, no output); records whose
    image is missing, unreadable or outside --images, or whose text is empty, are skipped and counted by reason.

    Examples:

      cm3 sft convert --task captioning --source captions_train2017.json --images coco/train2017 --tokenizer tok/ --out sft/coco

      cm3 sft convert --task vqa --source v2_Questions.json --annotations v2_Annotations.json --images coco/val2014 --image-pattern COCO_val2014_{:012d}.jpg --tokenizer tok/ --out sft/vqa

      cm3 sft convert --task captioning --format flickr30k --source dataset_flickr30k.json --split train --images flickr30k-images --tokenizer tok/ --out sft/flickr30k

      cm3 sft convert --task vqa --format scienceqa --source problems.json --splits pid_splits.json --split train --images ScienceQA/data/scienceqa/images --tokenizer tok/ --out sft/scienceqa
    """
    from cm3.pipeline.image_folder import ImageFolder
    from cm3.pipeline.sft_convert import convert
    from cm3.pipeline.sft_readers import DEFAULT_FORMATS, Sources, formats
    from cm3.pipeline.tokenize import tokenizer_identity
    from cm3.tokenizers.multimodal import MultimodalTokenizer

    known = formats()
    name = fmt or DEFAULT_FORMATS.get(task)
    if name is None:
        fail(f"--task {task!r}: expected one of {', '.join(DEFAULT_FORMATS)}")
    if name not in known:
        fail(f"--format {name!r}: expected one of {', '.join(known)}")
    if not images.is_dir():
        fail(f"--images {images}: no such folder")
    try:
        multimodal = MultimodalTokenizer.load(tokenizer)
        done = convert(name, known[name], task, Sources(source, annotations, splits, split),
                       ImageFolder(images, image_pattern), multimodal, out, shard_rows, seed,
                       tokenizer_identity=tokenizer_identity(tokenizer))
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(f"{out}: {len(done.written)} task shard(s) written, {done.rows} {task} rows; {done.skips.summary()}")


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
    from cm3.pipeline.tokenize import tokenizer_identity
    from cm3.synthetic.sft_tasks import demo_tasks
    from cm3.tokenizers.multimodal import MultimodalTokenizer

    try:
        multimodal = MultimodalTokenizer.load(tokenizer)
        written = write_task_shards(demo_tasks(multimodal, n, seed), out, multimodal.tokens_per_image, shard_rows,
                                    tokenizer_identity(tokenizer))
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(f"{out}: {len(written)} task shard(s) written ({7 * n} rows)")
