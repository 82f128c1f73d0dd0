"""``cm3 eval``: the paper's measures on data a user supplies (docs/evaluation.md). The commands parse and check
their options; ``cm3.evaluation`` does the work."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path
from typing import Optional

import typer

from cm3.core.errors import InputError
from cm3.evaluation.options import (CAPTION_PROMPT, IMAGE_PATTERN, VQA_ANSWER_TOKENS, VQA_TEMPLATE,
                                    ImageToTextOptions, TextToImageOptions)
from cm3.workflows.commands.common import CLIP_PRETRAINED_HELP, clip_identity, fail, json_summary, training_device


def _values(option: str, text: str, kind: type) -> tuple:
    """A comma-separated ablation option: one report row per value."""
    try:
        values = tuple(kind(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        fail(f"--{option} {text!r}: expected comma-separated {kind.__name__} values")
    if not values:
        fail(f"--{option}: give at least one value")
    return values


def _device(name: str) -> str:
    try:
        return str(training_device(name))
    except ValueError as err:
        fail(str(err))


class _Defaults:
    """An options dataclass's field defaults as attributes (without building one: its checks need real paths)."""

    def __init__(self, options: type):
        self.__dict__.update({f.name: f.default for f in fields(options) if f.default is not MISSING})


T2I = _Defaults(TextToImageOptions)  # the defaults of `cm3 eval text-to-image`
I2T = _Defaults(ImageToTextOptions)  # and of `cm3 eval caption` and `cm3 eval vqa`


def _joined(values: tuple) -> str:
    """An ablation default as the comma-separated text the command takes."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _summary(metrics: dict) -> None:
    for row in metrics["rows"]:
        label = row.get("setting", metrics["run"]["task"])
        typer.echo(f"{label}: " + json_summary({k: v["value"] for k, v in row.items() if isinstance(v, dict)}))


def eval_text_to_image(
    checkpoint: Path = typer.Option(..., help="Checkpoint folder (decoder + tokenizer)."),
    prompts: Path = typer.Option(..., help="COCO captions JSON, JSONL of {\"prompt\": ...}, or a folder of cm3 shards."),
    out: Path = typer.Option(..., help="Folder for samples/, metrics.json and report.md (re-runs reuse the samples)."),
    references: Optional[Path] = typer.Option(None, help="Real images for FID / FD-CLIP: a folder of images or cm3 raw shards."),
    samples: int = typer.Option(T2I.samples, min=1, help="Images per prompt (the paper: 8, with --rerank)."),
    retrieved: str = typer.Option(_joined(T2I.retrieved), help="Retrieved documents per prompt; comma-separated values are ablation rows."),
    guidance: str = typer.Option(_joined(T2I.guidance), help="CFG scale(s), comma-separated."),
    method: str = typer.Option(_joined(T2I.methods), help="top_p, cd_k, greedy or mix (half top-p, half CD-K), comma-separated."),
    index: Optional[Path] = typer.Option(None, help="Index folder (cm3 build-index) for --retrieved above 0."),
    rerank: bool = typer.Option(T2I.rerank, "--rerank", help="Keep each prompt's best sample by CLIP score (the paper's FID recipe)."),
    clip_dir: Optional[Path] = typer.Option(None, "--clip", help="A CLIP folder written by `cm3 clip train`: CLIP score, FD-CLIP, --rerank."),
    clip_model: Optional[str] = typer.Option(None, help="An OpenCLIP model name instead, e.g. ViT-B-32."),
    clip_pretrained: Optional[str] = typer.Option(None, help=CLIP_PRETRAINED_HELP),
    inception: Optional[Path] = typer.Option(None, help="FID Inception weights file (default: torch-fidelity's cache)."),
    metrics: Optional[str] = typer.Option(None, help="Some of fid,fd_clip,clip_score (default: fid, plus the CLIP ones given a CLIP model)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Evaluate on this many prompts, drawn at random with --seed (the paper: 30000)."),
    seed: int = typer.Option(T2I.seed, help="Sampling seed (shard i uses seed + i) and the --limit draw."),
    batch_size: int = typer.Option(T2I.batch_size, min=1, help="Images per decoder call."),
    temperature: float = typer.Option(T2I.temperature, help="Sampling temperature."),
    top_p: float = typer.Option(T2I.top_p, help="Nucleus mass."),
    cd_alpha: float = typer.Option(T2I.cd_alpha, help="CD-K plausibility cut-off alpha."),
    cd_k: int = typer.Option(T2I.cd_k, help="CD-K: compare with the k-th largest expert probability."),
    device: str = typer.Option("auto", help="auto (the first GPU, else the CPU), cpu, cuda or cuda:N."),
) -> None:
    """Text to image: generate images for prompts, score FID, FD-CLIP and CLIP score, one row per setting.

    Examples:

      cm3 eval text-to-image --checkpoint ckpt/sft --prompts captions_val2014.json --references coco/val2014 --out eval/coco --limit 30000 --samples 8 --method mix --rerank --clip-model ViT-B-32 --clip-pretrained openai

      cm3 eval text-to-image --checkpoint ckpt/sft --prompts prompts.jsonl --references real/ --out eval/ablation --retrieved 0,1,2 --index data/index --guidance 1,3,6
    """
    from cm3.evaluation.text_to_image import evaluate_text_to_image

    try:
        options = TextToImageOptions(
            checkpoint=checkpoint, prompts=prompts, out=out, references=references, samples=samples,
            retrieved=_values("retrieved", retrieved, int), guidance=_values("guidance", guidance, float),
            methods=_values("method", method, str), index=index, rerank=rerank,
            clip=clip_identity(clip_dir, clip_model, clip_pretrained), inception=inception,
            metrics=_values("metrics", metrics, str) if metrics else None, limit=limit, seed=seed,
            batch_size=batch_size, temperature=temperature, top_p=top_p, cd_alpha=cd_alpha, cd_k=cd_k,
            device=_device(device))
        _summary(evaluate_text_to_image(options))
    except (InputError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    typer.echo(f"{out / 'metrics.json'}, {out / 'report.md'}")


def eval_caption(
    checkpoint: Path = typer.Option(..., help="Checkpoint folder (decoder + tokenizer)."),
    images: Path = typer.Option(..., help="Folder of the references' image files, or cm3 raw shards (matched by URL file name)."),
    references: Path = typer.Option(..., help="COCO captions JSON: images (id, file_name) and annotations (image_id, caption)."),
    out: Path = typer.Option(..., help="Folder for predictions.json, metrics.json and report.md."),
    prompt: str = typer.Option(CAPTION_PROMPT, help="Text after the image, e.g. an SFT instruction (\"describe the image.\")."),
    limit: Optional[int] = typer.Option(None, min=1, help="Evaluate on this many images, drawn at random with --seed."),
    seed: int = typer.Option(I2T.seed, help="The --limit draw."),
    batch_size: int = typer.Option(I2T.batch_size, min=1, help="Images per decoder call."),
    max_new_tokens: int = typer.Option(I2T.max_new_tokens, min=1, help="Longest caption."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Image to text: caption images and score CIDEr and BLEU-4 against COCO-format references.

    Example:

      cm3 eval caption --checkpoint ckpt/sft --images coco/val2014 --references captions_val2014.json --out eval/captions --prompt "describe the image."
    """
    from cm3.evaluation.image_to_text import evaluate_captions

    options = ImageToTextOptions(checkpoint, images, out, batch_size, max_new_tokens, limit, seed, _device(device))
    try:
        _summary(evaluate_captions(options, references, prompt))
    except (InputError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    typer.echo(f"{out / 'metrics.json'}, {out / 'report.md'}")


def eval_vqa(
    checkpoint: Path = typer.Option(..., help="Checkpoint folder (decoder + tokenizer)."),
    images: Path = typer.Option(..., help="Folder of the images, or cm3 raw shards (matched by URL file name)."),
    questions: Path = typer.Option(..., help="VQA2 questions JSON (questions: image_id, question, question_id)."),
    annotations: Path = typer.Option(..., help="VQA2 annotations JSON (annotations: question_id, answers)."),
    out: Path = typer.Option(..., help="Folder for predictions.json, metrics.json and report.md."),
    image_pattern: str = typer.Option(IMAGE_PATTERN, help="How an image id becomes a file name, e.g. COCO_val2014_{:012d}.jpg."),
    template: str = typer.Option(VQA_TEMPLATE, help="Text after the image; {text} is the question (SFT: \"question: {text} answer:\")."),
    limit: Optional[int] = typer.Option(None, min=1, help="Evaluate on this many questions, drawn at random with --seed."),
    seed: int = typer.Option(I2T.seed, help="The --limit draw."),
    batch_size: int = typer.Option(I2T.batch_size, min=1, help="Questions per decoder call."),
    max_new_tokens: int = typer.Option(VQA_ANSWER_TOKENS, min=1, help="Longest answer."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """VQA: answer questions about images and score VQA2's accuracy (VizWiz uses the same).

    Example:

      cm3 eval vqa --checkpoint ckpt/sft --images coco/val2014 --image-pattern COCO_val2014_{:012d}.jpg --questions v2_OpenEnded_mscoco_val2014_questions.json --annotations v2_mscoco_val2014_annotations.json --out eval/vqa
    """
    from cm3.evaluation.image_to_text import evaluate_vqa

    options = ImageToTextOptions(checkpoint, images, out, batch_size, max_new_tokens, limit, seed, _device(device))
    try:
        _summary(evaluate_vqa(options, questions, annotations, image_pattern, template))
    except (InputError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    typer.echo(f"{out / 'metrics.json'}, {out / 'report.md'}")
