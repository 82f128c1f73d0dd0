"""Every sequence the decoder reads or writes is laid out here, and only here.

Ids are joint-space ids (``cm3.tokenizers.vocabulary``); an image enters as its VQ codes. A *document* is one
image-text pair, ``text <break> IMG`` (caption first: text-to-image) or ``IMG <break> text`` (image first:
captioning). A sequence opens with ``<eod>`` and joins its documents with ``<break>`` (metaseq's
``_tokenize_ra_json``)::

    pretraining        <eod> [retrieved: text <break> IMG <break>]* document <eod>
    evaluation         <eod> text <break> IMG <eod>                   (a pretraining example without retrieval)
    SFT tasks          captioning, vqa       <eod> IMG_in <break> instruction answer <eod>
                       text_to_image,        <eod> instruction <break> IMG_out <eod>
                       grounded_generation
                       image_editing         <eod> source <break> IMG_in <break> instruction <break> IMG_out <eod>
    text -> image      <eod> [retrieved document <break>]* caption <break>      then the model writes IMG
    unconditional      <eod> <mask:0> <break>                                   (CFG's and CD-K's other stream)
    image -> text      <eod> IMG <break> [question]                             then the model writes text, <eod>

The generation prompts are the training layouts cut where the model takes over: a text-to-image prompt is a
caption-first example up to its image, a captioning prompt an image-first one up to its text. Image-to-text SFT
tasks put the image first so the answer is conditioned on it; editing is the paper's two-image layout, where the
source prompt names the input image as a retrieved document would.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from cm3.tokenizers.vocabulary import Vocabulary, int_array

Order = Literal["caption_first", "image_first"]
ORDERS: tuple[str, ...] = ("caption_first", "image_first")
TASKS: tuple[str, ...] = ("captioning", "vqa", "text_to_image", "image_editing", "grounded_generation")


@dataclass(frozen=True)
class Document:
    """One parsed document: joint text ids, VQ codes (1-D int64, one image) and which came first.

    ``order`` is None when the document holds a single modality (there is no order to tell).
    """

    text_ids: list[int]
    image_codes: np.ndarray | None
    order: Order | None


def encode_document(
    vocab: Vocabulary, text_ids: Sequence[int], image_codes: ArrayLike | None, order: Order = "caption_first"
) -> list[int]:
    """Lay one document out as in CM3Leon: ``text <break> IMG`` (caption first, text-to-image) or
    ``IMG <break> text`` (image first, captioning); a single modality has no <break>.

    ``text_ids`` are joint-space text ids; ``image_codes`` are one image's VQ codes (any shape).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    text = list(text_ids)
    vocab.bpe_ids(text)  # validates: text ids only
    if image_codes is None:
        if not text:
            raise ValueError("a document needs text, an image or both; got neither")
        return text
    image = vocab.image_ids(image_codes).reshape(-1).tolist()
    if not image:
        raise ValueError("image_codes is empty; pass None for a text-only document")
    if not text:
        return image
    return text + [vocab.break_] + image if order == "caption_first" else image + [vocab.break_] + text


def decode_document(vocab: Vocabulary, ids: ArrayLike, tokens_per_image: int) -> Document:
    """Inverse of `encode_document`; raises ValueError on anything that layout cannot produce."""
    if tokens_per_image < 1:
        raise ValueError(f"tokens_per_image must be >= 1, got {tokens_per_image}")
    ids = int_array(ids).reshape(-1)
    if ids.size == 0:
        raise ValueError("empty document")
    allowed = vocab.is_text(ids) | vocab.is_image(ids) | (ids == vocab.break_)
    if not allowed.all():
        position = int(np.flatnonzero(~allowed)[0])
        raise ValueError(f"unexpected token {vocab.describe(int(ids[position]))} at position {position}; "
                         "a document holds only text ids, image ids and at most one <break>")
    breaks = np.flatnonzero(ids == vocab.break_)
    if breaks.size > 1:
        raise ValueError(f"a document has at most one <break>, found {breaks.size} (positions {breaks.tolist()})")
    if breaks.size == 0:
        if vocab.is_text(ids[0]):
            return Document(_text_part(vocab, ids, "the document"), None, None)
        return Document([], _image_part(vocab, ids, tokens_per_image, "the document"), None)
    head, tail = ids[: breaks[0]], ids[breaks[0] + 1:]
    if head.size == 0 or tail.size == 0:
        raise ValueError("<break> must separate two non-empty parts")
    if vocab.is_image(head[0]):
        codes = _image_part(vocab, head, tokens_per_image, "the part before <break>")
        return Document(_text_part(vocab, tail, "the part after <break>"), codes, "image_first")
    text = _text_part(vocab, head, "the part before <break>")
    return Document(text, _image_part(vocab, tail, tokens_per_image, "the part after <break>"), "caption_first")


def _text_part(vocab: Vocabulary, ids: np.ndarray, where: str) -> list[int]:
    if not vocab.is_text(ids).all():
        raise ValueError(f"{where} should be all text but holds image ids")
    return ids.tolist()


def _image_part(vocab: Vocabulary, ids: np.ndarray, tokens_per_image: int, where: str) -> np.ndarray:
    if not vocab.is_image(ids).all():
        raise ValueError(f"{where} should be one image but holds text ids")
    if ids.size != tokens_per_image:
        raise ValueError(f"{where} holds {ids.size} image tokens; one image is {tokens_per_image}")
    return ids - vocab.image_offset


def _joined(vocab: Vocabulary, parts: Iterable[Sequence[int]]) -> list[int]:
    """``<eod>`` then the parts, separated by ``<break>``."""
    ids = [vocab.eod]
    for i, part in enumerate(parts):
        if i:
            ids.append(vocab.break_)
        ids += part
    return ids


def pretraining_example(vocab: Vocabulary, text_ids: Sequence[int], image_codes: ArrayLike, order: Order,
                        retrieved: Iterable[tuple[Sequence[int], ArrayLike]] = ()) -> list[int]:
    """``<eod> [text <break> IMG <break>]* document <eod>``: the ``retrieved`` (text ids, codes) documents caption
    first, then the main document in ``order``."""
    documents = [encode_document(vocab, text, codes) for text, codes in retrieved]
    return _joined(vocab, [*documents, encode_document(vocab, text_ids, image_codes, order)]) + [vocab.eod]


def task_example(vocab: Vocabulary, task: str, instruction_ids: Sequence[int], tokens_per_image: int, *,
                 answer_ids: Sequence[int] = (), source_ids: Sequence[int] = (),
                 input_image_ids: ArrayLike | None = None, output_image_ids: ArrayLike | None = None) -> list[int]:
    """One SFT example in the layout of ``task`` (module docstring); the two image arguments are VQ codes
    (named as the SFT task-shard columns that hold them), ``source_ids`` the editing layout's source prompt."""

    def image(codes: ArrayLike | None, column: str) -> tuple[bool, list[int]]:
        if codes is None or np.size(codes) != tokens_per_image:
            raise ValueError(f"{column} must hold {tokens_per_image} codes")
        return True, vocab.image_ids(codes).reshape(-1).tolist()

    if task in ("captioning", "vqa"):
        parts = [image(input_image_ids, "input_image_ids"), (False, [*instruction_ids, *answer_ids])]
    elif task in ("text_to_image", "grounded_generation"):
        parts = [(False, list(instruction_ids)), image(output_image_ids, "output_image_ids")]
    elif task == "image_editing":
        parts = [(False, list(source_ids)), image(input_image_ids, "input_image_ids"), (False, list(instruction_ids)),
                 image(output_image_ids, "output_image_ids")]
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    for is_image, part in parts:
        if not is_image:
            vocab.bpe_ids(part)  # validates: text ids only
    # cm3: <eod> part <break> part ... <eod>; a Chameleon vocabulary: <s> text <racm3:break> IMG <eoss> ... </s>
    return [vocab.bos, *vocab.join(parts), vocab.eos]


def image_prompt(vocab: Vocabulary, caption_ids: Sequence[int],
                 retrieved: Sequence[tuple[Sequence[int], Sequence[int]]] = ()) -> list[int]:
    """``<eod> [text <break> IMG <break>]* caption <break>``: the conditional text-to-image prompt; ``retrieved`` are
    (joint text ids, joint image ids) documents. Built from the vocabulary's layout names (``bos``, ``join``,
    ``begin_image``), so a Chameleon vocabulary gets its own image markers."""
    parts = [part for text, image in retrieved for part in ((False, text), (True, image))]
    return [vocab.bos, *vocab.join([*parts, (False, caption_ids)]), vocab.begin_image]


def unconditional_prompt(vocab: Vocabulary) -> list[int]:
    """``<eod> <mask:0> <break>``: the prompt text replaced by the CM3 mask token, as in the paper's CFG."""
    return [vocab.bos, *vocab.join([(False, vocab.unconditional_fill)]), vocab.begin_image]


def image_only_prompt(vocab: Vocabulary, prompt: Sequence[int]) -> list[int]:
    """The prompt with its text removed (images and their markers kept): the image-conditioned stream of
    Chameleon's guidance."""
    keep = {vocab.bos, vocab.begin_image, vocab.end_image}
    return [t for t in prompt if t in keep or bool(vocab.is_image(t))]


def caption_prompt(vocab: Vocabulary, image_ids: Sequence[int], question_ids: Sequence[int] = ()) -> list[int]:
    """``<eod> IMG <break> [question]``: the image-to-text prompt (``image_ids`` are joint ids)."""
    return [vocab.bos, *vocab.join([(True, image_ids), (False, question_ids)])]
