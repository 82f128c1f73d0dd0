"""The demo's quality metrics, judged by the demo data's own pixel checker and caption grammar.

- retrieval: share of retrieved neighbours whose caption names the query's colour and shape;
- text -> image: colour / shape accuracy of images generated for prompts of (shape, colour) pairs seen in
  training (new draws of the other attributes) and of held-out pairs (never seen together in training),
  read back by ``checker.read_attributes``;
- image -> text: share of captions of new images (seen and held-out pairs) that name the right colour and shape;
- the decoder's image loss given the caption on training images, new images of training pairs and held-out pairs;
- how much the decoder reads each attribute of the caption: the rise of that loss when one word is swapped;
- the paper's ablations in miniature: retrieval K=2 vs K=0, CFG vs none, top-p vs CD-K.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from cm3.core.images import decode, pixels_to_tensor, square_pixels, to_pil
from cm3.core.shards import complete_shards, parquet_path
from cm3.synthetic.checker import read_attributes
from cm3.synthetic.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeSpec,
    encode_jpeg,
    render,
)
from cm3.tokenizers.layout import pretraining_example

_WORDS = re.compile(r"[a-z]+")


def named_attributes(text: str) -> tuple[set[str], set[str]]:
    """(colours, shapes) a caption names."""
    words = set(_WORDS.findall(text.lower()))
    return words & set(COLOURS), words & set(SHAPES)


def names_colour_and_shape(text: str, colour: str, shape: str) -> bool:
    colours, shapes = named_attributes(text)
    return colours == {colour} and shapes == {shape}


def retrieval_agreement(augmented_dir: Path, tokens_dir: Path) -> dict:
    """Share of neighbours naming the query's colour and shape, over every augmented row."""
    captions = {}
    for shard in complete_shards(tokens_dir):
        table = pq.read_table(parquet_path(tokens_dir, shard), columns=["key", "caption"])
        captions.update(zip(table.column("key").to_pylist(), table.column("caption").to_pylist()))
    agree = total = rows_without = 0
    for shard in complete_shards(augmented_dir):
        table = pq.read_table(parquet_path(augmented_dir, shard), columns=["caption", "neighbour_keys"])
        for caption, neighbours in zip(table.column("caption").to_pylist(), table.column("neighbour_keys").to_pylist()):
            colours, shapes = named_attributes(caption)
            rows_without += not neighbours
            for key in neighbours:
                total += 1
                agree += named_attributes(captions[key]) == (colours, shapes)
    return {"neighbour_colour_and_shape_agreement": agree / total if total else 0.0, "neighbours": total,
            "rows_without_neighbours": rows_without}


def image_accuracy(images: torch.Tensor, specs: Sequence[ShapeSpec]) -> dict:
    """Colour and shape accuracy of generated images [N, 3, H, W] against the specs they were asked for."""
    colour = shape = 0
    for image, spec in zip(images, specs):
        reading = read_attributes(to_pil(image))
        colour += reading.ok and reading.colour == spec.colour
        shape += reading.ok and reading.shape == spec.shape
    n = max(len(specs), 1)
    return {"colour_accuracy": colour / n, "shape_accuracy": shape / n, "images": len(specs)}


def generate_for_specs(model, tokenizer, specs: Sequence[ShapeSpec], samples: int, sampling,
                       retriever=None, retrieved: int = 0, batch_prompts: int = 16) -> torch.Tensor:
    """``samples`` images per spec's caption [len(specs) * samples, 3, H, W] (a spec's samples next to each
    other), with ``retrieved`` documents from ``retriever`` prepended to each prompt; prompts are batched."""
    from cm3.model.generation import generate_image_tokens, text_to_image_prompt

    prompts = []
    for spec in specs:
        documents = retriever.for_text(spec.caption, retrieved) if retrieved else []
        prompts += [text_to_image_prompt(tokenizer, spec.caption, documents)] * samples
    rows = batch_prompts * samples
    ids = [generate_image_tokens(model, tokenizer.vocab, prompts[start:start + rows], tokenizer.tokens_per_image,
                                 replace(sampling, seed=None if sampling.seed is None else sampling.seed + start))
           for start in range(0, len(prompts), rows)]
    return tokenizer.decode_image(torch.cat(ids))


def caption_accuracy(captions: Sequence[str], specs: Sequence[ShapeSpec]) -> dict:
    right = sum(names_colour_and_shape(c, s.colour, s.shape) for c, s in zip(captions, specs))
    return {"colour_and_shape_named": right / max(len(specs), 1), "images": len(specs)}


def spec_images(specs: Sequence[ShapeSpec], resolution: int, as_served: bool = False) -> torch.Tensor:
    """Rendered specs as the float [-1, 1] batch the tokenizer takes; ``as_served``: through the JPEG the demo
    server sends, so their codes match the training images' codes."""
    rendered = [render(spec, resolution) for spec in specs]
    if as_served:
        rendered = [decode(encode_jpeg(image)) for image in rendered]
    return pixels_to_tensor(np.stack([square_pixels(image, resolution) for image in rendered]))


def spec_codes(tokenizer, specs: Sequence[ShapeSpec]) -> torch.Tensor:
    """VQ codes [N, tokens_per_image] of the specs' images as the server sends them (the training images' codes)."""
    return tokenizer.vq.encode(spec_images(specs, tokenizer.vq.config.resolution, as_served=True)).flatten(1)


def caption_first_documents(tokenizer, texts: Sequence[str], codes: torch.Tensor) -> list[list[int]]:
    """Each image's codes after its text, laid out as pretraining lays out a caption-first example without
    retrieved documents (``<eod> text <break> IMG <eod>``)."""
    return [pretraining_example(tokenizer.vocab, tokenizer.encode_caption(text), image_codes.numpy(), "caption_first")
            for text, image_codes in zip(texts, codes)]


# the attributes a caption can name wrong (an attribute of one value, like today's size, cannot be)
ATTRIBUTE_VALUES: dict[str, Sequence[str]] = {
    name: values for name, values in (("colour", list(COLOURS)), ("shape", SHAPES), ("size", SIZES),
                                      ("position", POSITIONS), ("background", list(BACKGROUNDS))) if len(values) > 1}


def swapped(spec: ShapeSpec, attribute: str) -> ShapeSpec:
    """The spec with ``attribute`` set to the next value of its list: a caption that names one thing wrong."""
    values = ATTRIBUTE_VALUES[attribute]
    return replace(spec, **{attribute: values[(values.index(getattr(spec, attribute)) + 1) % len(values)]})


def reliance_documents(tokenizer, specs: Sequence[ShapeSpec], codes: torch.Tensor) -> dict[str, list[list[int]]]:
    """The images (``codes``) after their full caption (``"full_caption"``) and after captions that name one
    attribute wrong (``"<attribute>_swapped"``): what ``caption_reliance`` scores."""
    variants = {"full_caption": [spec.caption for spec in specs]}
    variants.update({f"{attribute}_swapped": [swapped(spec, attribute).caption for spec in specs]
                     for attribute in ATTRIBUTE_VALUES})
    return {name: caption_first_documents(tokenizer, texts, codes) for name, texts in variants.items()}


def caption_reliance(model, vocab, documents: dict[str, list[list[int]]]) -> dict[str, float]:
    """How much the decoder reads each word of the caption: the image loss (nats per image token) after the full
    caption, and how much it rises when the caption names one attribute wrong (``reliance_documents``). A rise
    near 0 means the decoder draws that attribute without reading it (from retrieved images, or not at all), so
    no sampling setting can make its samples follow that word."""
    given_truth = image_nll(model, vocab, documents["full_caption"])
    rise = {name: image_nll(model, vocab, docs) - given_truth for name, docs in documents.items()
            if name != "full_caption"}
    return {"full_caption": given_truth, **rise}


@torch.no_grad()
def image_nll(model, vocab, documents: Sequence[Sequence[int]]) -> float:
    """Nats per image token that the decoder gives the documents' image codes (``caption_first_documents``:
    after their caption). Scored on new images of training pairs and on held-out pairs, it tells
    generalisation from memorisation with far less noise than a few dozen sampled images."""
    total = count = 0.0
    for document in documents:
        ids = torch.tensor([document])
        nll = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="none")
        is_image = torch.from_numpy(np.asarray(vocab.is_image(ids[0, 1:].numpy())))
        total += nll[is_image].sum().item()
        count += is_image.sum().item()
    return total / max(count, 1)
