"""Captioning and VQA evaluation runs: the model's answers for images a user supplies, scored against references.

Answers are decoded greedily with the image-to-text layout (``<eod> IMG <break> [text]``, the SFT layout of
captioning and VQA up to the answer), in batches. They are kept in ``DIR/predictions.json`` with what produced them,
so a re-run with the same checkpoint and inputs scores them again without decoding.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cm3.core.errors import InputError
from cm3.core.files import read_json, write_json
from cm3.core.images import pixels_to_tensor
from cm3.evaluation.caption_scores import caption_scores
from cm3.evaluation.options import CAPTION_PROMPT, IMAGE_PATTERN, VQA_TEMPLATE, ImageToTextOptions
from cm3.evaluation.sources import NamedImages, read_caption_references, read_vqa
from cm3.evaluation.vqa_accuracy import vqa_accuracy
from cm3.tokenizers.layout import caption_prompt

PREDICTIONS_FILE = "predictions.json"
EXAMPLES = 8


def answers(options: ImageToTextOptions, names: Sequence[str], texts: Sequence[str], desc: str) -> list[str]:
    """The model's greedy answer for each (image name, text after the image), kept in ``predictions.json``."""
    from cm3.model.checkpoint import load_checkpoint
    from cm3.model.generation import generate_text
    from cm3.model.sampling_options import SamplingConfig

    images = NamedImages(options.images)
    stamp = {"checkpoint": str(Path(options.checkpoint).resolve()),
             "checkpoint_files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns]
                                  for p in sorted(Path(options.checkpoint).iterdir()) if p.is_file()},
             "images": str(Path(options.images).resolve()), "max_new_tokens": options.max_new_tokens,
             "inputs_sha256": hashlib.sha256(json.dumps([list(names), list(texts)]).encode()).hexdigest()}
    kept = options.out / PREDICTIONS_FILE
    if kept.is_file() and (previous := read_json(kept)).get("identity") == stamp:
        return previous["predictions"]
    model, tokenizer = load_checkpoint(options.checkpoint, device=options.device)
    size, vocab, out = tokenizer.vq.config.resolution, tokenizer.vocab, []
    for start in tqdm(range(0, len(names), options.batch_size), desc=desc, unit="batch"):
        chunk = slice(start, start + options.batch_size)
        pixels = np.stack([images.pixels(name, size) for name in names[chunk]])
        codes = tokenizer.encode_image(pixels_to_tensor(pixels).to(options.device)).tolist()
        prompts = [caption_prompt(vocab, row, tokenizer.encode_caption(text) if text else [])
                   for row, text in zip(codes, texts[chunk])]
        ids = generate_text(model, vocab, prompts, options.max_new_tokens, SamplingConfig(method="greedy"))
        out += [tokenizer.decode_text(row).strip() for row in ids]
    options.out.mkdir(parents=True, exist_ok=True)
    write_json(kept, {"identity": stamp, "predictions": out})
    return out


def evaluate_captions(options: ImageToTextOptions, references: Path, prompt: str = CAPTION_PROMPT) -> dict:
    """CIDEr and BLEU-4 of one caption per annotated image of a COCO captions file (``prompt``: the instruction
    after the image, e.g. the SFT template "describe the image."; empty for a pretrained model)."""
    from cm3.evaluation.report import write_text_report

    items = options.subset(read_caption_references(references))
    predicted = answers(options, [item.image for item in items], [prompt] * len(items), "captioning")
    scores = caption_scores({i: item.captions for i, item in enumerate(items)}, dict(enumerate(predicted)))
    row = {"cider": {"value": scores["cider"], "samples": scores["samples"]},
           "bleu4": {"value": scores["bleu4"], "samples": scores["samples"]}}
    run = {"task": "caption", "checkpoint": str(options.checkpoint), "images": str(options.images),
           "references": str(references), "prompt": prompt, "limit": options.limit, "seed": options.seed}
    examples = [(item.image, answer, " / ".join(item.captions[:3])) for item, answer in zip(items, predicted)]
    return write_text_report(options.out, run, row, examples[:EXAMPLES])


def evaluate_vqa(options: ImageToTextOptions, questions: Path, annotations: Path,
                 image_pattern: str = IMAGE_PATTERN, template: str = VQA_TEMPLATE) -> dict:
    """VQA accuracy of one answer per question; ``image_pattern`` turns an image id into a file name (e.g.
    ``COCO_val2014_{:012d}.jpg``), ``template`` the question into the text after the image (SFT's templates)."""
    from cm3.evaluation.report import write_text_report

    items = options.subset(read_vqa(questions, annotations))
    try:
        names = [image_pattern.format(item.image_id) for item in items]
        texts = [template.format(text=item.question) for item in items]
    except (KeyError, IndexError, ValueError) as err:
        raise InputError(f"--image-pattern {image_pattern!r} / --template {template!r}: {err!r} (use {{}} or "
                         f"{{:012d}} for the image id, {{text}} for the question)") from err
    predicted = answers(options, names, texts, "vqa")
    scores = vqa_accuracy(dict(enumerate(predicted)), {i: item.answers for i, item in enumerate(items)})
    row = {"vqa_accuracy": {"value": scores["vqa_accuracy"], "samples": scores["samples"]}}
    run = {"task": "vqa", "checkpoint": str(options.checkpoint), "images": str(options.images),
           "questions": str(questions), "annotations": str(annotations), "image_pattern": image_pattern,
           "template": template, "limit": options.limit, "seed": options.seed}
    examples = [(name, f"{item.question} -> {answer}", ", ".join(a for a, _ in Counter(item.answers).most_common(3)))
                for name, item, answer in zip(names, items, predicted)]
    return write_text_report(options.out, run, row, examples[:EXAMPLES])
