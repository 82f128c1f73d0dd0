"""Training sequences from token shards: retrieved documents first, the CM3 transform, packing.

One example is laid out by ``cm3.tokenizers.layout.pretraining_example`` (metaseq ``_tokenize_ra_json``):

    <eod> [retrieved: text <break> IMG <break>]* main document <eod>

where the main document is caption-first (``text <break> IMG``: text-to-image) or, with
probability ``image_first``, image-first (``IMG <break> text``: captioning). The CM3 transform
(``cm3_transform``) then moves Poisson(1) spans to the end. Examples are packed into windows of
``seq_len + 1`` tokens (inputs ``[:-1]``, targets ``[1:]``); an example never straddles two windows
(a retrieved image cut from its caption teaches nothing), the unused tail is padding with loss
weight 0.

Attention inside a pack is plain causal attention across example boundaries, as in metaseq and
GPT-style packing: every example opens with ``<eod>``, which the model learns to treat as a reset,
and the fused causal SDPA kernel needs no per-pack mask. Retrieved documents get the same loss
weight as the main one (CM3Leon dropped RA-CM3's up-weighting of the query).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from cm3.model.objective import cm3_transform
from cm3.tokenizers.layout import pretraining_example
from cm3.tokenizers.vocabulary import Vocabulary


@dataclass(frozen=True)
class SequenceConfig:
    seq_len: int
    retrieved_min: int = 2  # K per example is drawn from Uniform{retrieved_min..retrieved_max}
    retrieved_max: int = 2  # (RA-CM3 trained with K ~ Uniform{0, 1, 2}; CM3Leon's default is 2)
    image_first: float = 0.5  # share of main documents in captioning order
    cm3: bool = True  # False: plain causal LM (no spans)
    poisson_lambda: float = 1.0

    def __post_init__(self) -> None:
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be at least 8, got {self.seq_len}")
        if not 0 <= self.retrieved_min <= self.retrieved_max:
            raise ValueError(f"need 0 <= retrieved_min <= retrieved_max, got {self.retrieved_min}, {self.retrieved_max}")
        if not 0.0 <= self.image_first <= 1.0:
            raise ValueError(f"image_first must be a probability, got {self.image_first}")


@dataclass(frozen=True)
class Packed:
    inputs: np.ndarray  # int64 [seq_len]
    targets: np.ndarray  # int64 [seq_len]
    weights: np.ndarray  # float32 [seq_len]: 0 on padding and on in-body sentinel targets


def example_ids(row: dict, vocab: Vocabulary, config: SequenceConfig, rng: np.random.Generator) -> list[int]:
    """One example's ids before the CM3 transform. ``row`` holds ``text_ids`` (BPE ids), ``image_ids``
    (VQ codes) and optionally ``neighbour_text_ids`` / ``neighbour_image_ids`` (retrieved documents)."""
    k = int(rng.integers(config.retrieved_min, config.retrieved_max + 1))
    neighbours = list(zip(row.get("neighbour_text_ids") or [], row.get("neighbour_image_ids") or []))[:k]
    order = "image_first" if rng.random() < config.image_first else "caption_first"
    retrieved = [(vocab.text_ids(text), np.asarray(codes)) for text, codes in neighbours]
    return pretraining_example(vocab, vocab.text_ids(row["text_ids"]), np.asarray(row["image_ids"]), order, retrieved)


def transformed_example(row: dict, vocab: Vocabulary, config: SequenceConfig,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(ids, weights of predicting ids[1:]) for one document row (``example_ids``), cut to fit one window."""
    return transform(example_ids(row, vocab, config, rng), vocab, config, rng)


def transform(ids: list[int], vocab: Vocabulary, config: SequenceConfig,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(ids, weights of predicting ids[1:]) of a laid-out example after the CM3 transform (none when
    ``config.cm3`` is False), cut to fit one window."""
    if config.cm3:
        transformed = cm3_transform(ids, vocab, rng, config.seq_len + 1, poisson_lambda=config.poisson_lambda)
        return transformed.ids, transformed.loss_weights
    ids = np.asarray(ids[: config.seq_len + 1], dtype=np.int64)
    return ids, np.ones(len(ids) - 1, dtype=np.float32)


def pack(examples: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int, pad: int) -> Iterator[Packed]:
    """Greedily fill windows of seq_len + 1 tokens with whole examples; pad the tail with weight 0."""
    window = seq_len + 1
    ids: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    used = 0

    def flush() -> Packed:
        flat_ids = np.full(window, pad, dtype=np.int64)
        flat_weights = np.zeros(window - 1, dtype=np.float32)
        pos = 0
        for part_ids, part_weights in zip(ids, weights):
            flat_ids[pos: pos + len(part_ids)] = part_ids
            flat_weights[pos: pos + len(part_weights)] = part_weights
            pos += len(part_ids)  # the weight for predicting the next example's first token stays 0
        return Packed(flat_ids[:-1], flat_ids[1:], flat_weights)

    for example_ids_, example_weights in examples:
        if used and used + len(example_ids_) > window:
            yield flush()
            ids, weights, used = [], [], 0
        ids.append(example_ids_)
        weights.append(example_weights)
        used += len(example_ids_)
    if used:
        yield flush()


def packed_sequences(rows: Iterable[dict], vocab: Vocabulary, config: SequenceConfig,
                     rng: np.random.Generator) -> Iterator[Packed]:
    """Rows of (augmented) token shards -> packed training windows."""
    return pack((transformed_example(row, vocab, config, rng) for row in rows), config.seq_len, vocab.pad)
