"""Commands that train the tokenizers and the small CLIP."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cm3.tokenizers.training_options import ClipTrainOptions, TrainOptions, demo_training_options
from cm3.workflows.commands.common import fail, json_summary, training_device

VQ = TrainOptions()  # the defaults of `cm3 tokenizer train-vq`
CLIP = ClipTrainOptions()  # the defaults of `cm3 clip train`


def tokenizer_train_vq(
    data: Path = typer.Option(..., help="Raw shards folder written by cm3 ingest."),
    out: Path = typer.Option(..., help="Folder for checkpoint/, report.json and reconstructions.png."),
    preset: str = typer.Option("f8-8192", help="f8-8192 (1024 tokens, the paper's), f16-1024, or demo (64 tokens)."),
    steps: int = typer.Option(VQ.steps, min=1, help="Optimizer steps (or stop at --seconds)."),
    seconds: Optional[float] = typer.Option(None, help="Wall-clock training budget in seconds."),
    batch_size: int = typer.Option(VQ.batch_size, min=1, help="Images per step."),
    lr: float = typer.Option(VQ.lr, help="Learning rate (Adam, betas 0.5/0.9 as taming)."),
    warmup_steps: Optional[int] = typer.Option(None, min=1, help="Linear learning-rate warm-up (default: the "
                                               "preset's, 1000 steps for demo, 5 otherwise)."),
    threads: Optional[int] = typer.Option(VQ.num_threads, min=1,
                                          help="torch CPU threads (default: torch's, one per core)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N, or auto (the first GPU when there is one)."),
    lpips_weights: Optional[Path] = typer.Option(None, help="Local LPIPS weights file: adds the perceptual loss."),
    ema_decay: Optional[float] = typer.Option(VQ.ema_decay,
                                              help="Save and evaluate an EMA of the weights (e.g. 0.999)."),
    resume: bool = typer.Option(True, help="Continue from OUT/checkpoint when it exists."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train the VQ-GAN image tokenizer (reconstruction, codebook and commitment losses, PatchGAN after a delay).

    Examples:

      cm3 tokenizer train-vq --data data/raw --out vq/ --preset f8-8192

      cm3 tokenizer train-vq --data runs/demo/raw --out vq/ --preset demo --seconds 600 --batch-size 4
    """
    from dataclasses import replace

    from cm3.tokenizers.vq_training import train_vqgan
    from cm3.tokenizers.vqgan import VQGANConfig

    try:
        config = VQGANConfig.preset(preset)
        if lpips_weights is not None and not lpips_weights.is_file():
            raise ValueError(f"{lpips_weights}: no such LPIPS weights file")
        options = demo_training_options() if preset == "demo" else TrainOptions()
        options = replace(options, steps=steps, batch_size=batch_size, lr=lr, num_threads=threads,
                          ema_decay=ema_decay, warmup_steps=warmup_steps or options.warmup_steps)
        report = train_vqgan(data, out, config, seconds_budget=seconds, lpips_weights=lpips_weights, resume=resume,
                             progress=progress, options=options, device=training_device(device))
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(f"{out}: held-out PSNR {report['heldout_psnr_db']:.2f} dB, SSIM {report['heldout_ssim']:.3f}, "
               f"codebook usage {report['heldout_codebook_usage']:.2f} after {report['steps']} steps; "
               f"weights in {out / 'checkpoint'}")


def tokenizer_train_text(
    data: Path = typer.Option(..., help="Raw shards folder (cm3 ingest output) or one Parquet file."),
    out: Path = typer.Option(..., help="Where to write tokenizer.json."),
    vocab_size: int = typer.Option(8192, min=300, help="BPE vocabulary size (the paper used 56,320)."),
    caption_col: str = typer.Option("caption", help="Caption column."),
) -> None:
    """Train a byte-level BPE text tokenizer on the shards' captions.

    Example:

      cm3 tokenizer train-text --data data/raw --out tok/tokenizer.json --vocab-size 8192
    """
    from cm3.tokenizers.text import train_from_shards

    try:
        tokenizer = train_from_shards(data, vocab_size, caption_col)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    typer.echo(f"{out}: {tokenizer.vocab_size} tokens")


def tokenizer_build(
    text: Path = typer.Option(..., help="A tokenizer.json (from train-text, or any Hugging Face one)."),
    vq: Path = typer.Option(..., help="A VQ-GAN folder (train-vq's OUT/checkpoint, or VQGAN.save_pretrained)."),
    out: Path = typer.Option(..., help="Folder for the joint tokenizer artefact."),
) -> None:
    """Join a text tokenizer and a VQ-GAN into one artefact with one id space (MultimodalTokenizer).

    Example:

      cm3 tokenizer build --text tok/tokenizer.json --vq vq/checkpoint --out tokenizer/
    """
    from cm3.tokenizers.multimodal import MultimodalTokenizer
    from cm3.tokenizers.text import TextTokenizer
    from cm3.tokenizers.vqgan import VQGAN

    for path in (text, vq):
        if not path.exists():
            fail(f"{path}: no such file or folder")
    tokenizer = MultimodalTokenizer(TextTokenizer.from_file(text), VQGAN.from_pretrained(vq))
    tokenizer.save(out)
    vocab = tokenizer.vocab
    typer.echo(f"{out}: {vocab.size} ids (text {vocab.text_vocab_size} from {vocab.text_offset}, "
               f"image {vocab.image_vocab_size} from {vocab.image_offset}), {tokenizer.tokens_per_image} tokens/image")


def clip_train(
    data: Path = typer.Option(..., help="Raw shards folder written by cm3 ingest."),
    out: Path = typer.Option(..., help="Folder for the checkpoint and clip_config.json."),
    model: str = typer.Option(CLIP.model_name, help="OpenCLIP model name (this project's small configs included)."),
    steps: int = typer.Option(CLIP.steps, min=1, help="Optimizer steps (or stop at --seconds)."),
    seconds: Optional[float] = typer.Option(None, help="Wall-clock training budget in seconds."),
    batch_size: int = typer.Option(CLIP.batch_size, min=2, help="Image-text pairs per step."),
    lr: float = typer.Option(CLIP.lr, help="Peak learning rate (AdamW, cosine)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train a small OpenCLIP model from scratch on ingested pairs (for machines that cannot download CLIP).

    The checkpoint loads with open_clip.create_model_and_transforms(MODEL, pretrained=FILE), and
    `--clip OUT` passes it to cm3 tokenize / ingest / build-index.

    Example:

      cm3 clip train --data runs/demo/raw --out clip/ --seconds 240
    """
    from dataclasses import replace

    from cm3.tokenizers.clip_training import train_clip

    options = replace(CLIP, model_name=model, steps=steps, batch_size=batch_size, lr=lr)
    try:
        report = train_clip(data, out, options, seconds_budget=seconds, progress=progress)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(f"{out}: {json_summary(report)}")
