"""Instruction-tuning rows from the synthetic shapes: every SFT task, built from the generator's own specs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
from cm3.pipeline.sft_tasks import TaskRow, box_text, chunks, encode_images, make_row
from cm3.synthetic import shapes
from cm3.tokenizers.multimodal import MultimodalTokenizer

DEMO_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("what colour is the shape?", "colour"),
    ("what shape is it?", "shape"),
    ("where is the shape?", "position"),
)


def _demo_edit_colour(spec: shapes.ShapeSpec, seed: int, index: int) -> str:
    """Another colour for the spec's shape that keeps the (shape, colour) pair out of HELD_OUT."""
    choices = [c for c in shapes.COLOURS if c != spec.colour and (spec.shape, c) not in shapes.HELD_OUT]
    return choices[int(np.random.default_rng([seed, index]).integers(len(choices)))]


def demo_tasks(tokenizer: MultimodalTokenizer, n: int, seed: int = 0, batch_size: int = 32) -> Iterator[TaskRow]:
    """Seven rows per demo image ``spec_for(i, seed, "train")``, i < n: captioning, three VQA questions
    (colour, shape, position), text-to-image, a recolouring edit and grounded generation.

    Rendered straight from the generator (exact specs, no caption parsing); training specs never
    hold a HELD_OUT pair and edits never recolour into one.
    """
    resolution = tokenizer.vq.config.resolution
    for chunk in chunks(range(n), batch_size):
        specs = [shapes.spec_for(i, seed, "train") for i in chunk]
        edited = [replace(s, colour=_demo_edit_colour(s, seed, i)) for i, s in zip(chunk, specs)]
        codes = encode_images(tokenizer, [shapes.render(s, resolution) for s in specs + edited])
        for offset, (index, spec, target) in enumerate(zip(chunk, specs, edited)):
            image, edited_image, key = codes[offset], codes[len(chunk) + offset], f"demo:{seed}:{index}"
            yield make_row(tokenizer, "captioning", key, seed, input_image_ids=image, output_text=spec.caption)
            for question, attribute in DEMO_QUESTIONS:
                yield make_row(tokenizer, "vqa", f"{key}:{attribute}", seed, input_text=question,
                               input_image_ids=image, output_text=getattr(spec, attribute))
            yield make_row(tokenizer, "text_to_image", key, seed, input_text=spec.caption, output_image_ids=image)
            yield make_row(tokenizer, "image_editing", key, seed, input_text=f"make the {spec.shape} {target.colour}",
                           input_image_ids=image, output_image_ids=edited_image)
            grounded = box_text(f"{spec.colour} {spec.shape}", spec.bbox, 0, 0, shapes.CANVAS)
            yield make_row(tokenizer, "grounded_generation", key, seed, input_text=grounded, output_image_ids=image)
