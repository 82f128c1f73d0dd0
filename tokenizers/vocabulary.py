"""The joint id space of text and image tokens (``cm3.tokenizers.layout`` lays them out in sequences).

Naming used throughout: *ids* are joint-space ids (what the model reads and writes); *bpe ids*
are the text tokenizer's own ids; *codes* are VQ-GAN codebook indices. Layout, low to high:

    <pad> <eod> <break> <eoss> | <task:0..T-1> | <mask:0..M-1> | text (bpe id + text_offset) | images (code + image_offset)

Images come last as ONE contiguous range, so "is this an image token" is a single comparison
and restricting generation to image tokens is a slice of the logits.

Generation, captioning and instruction-tuning layouts ask a vocabulary only for the names in "Layout" below
(`bos`, `eos`, `begin_image`, `end_image`, `join`, ...), which `ChameleonVocabulary` (tokenizers/chameleon.py)
answers too: a converted Chameleon checkpoint keeps its own ids and its own image markers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from cm3.tokenizers.layout import Order

SPECIAL_NAMES: tuple[str, ...] = ("<pad>", "<eod>", "<break>", "<eoss>")


@dataclass(frozen=True)
class Vocabulary:
    """Sizes of each range; every offset is derived, so the dict form is just these four numbers."""

    text_vocab_size: int
    image_vocab_size: int
    num_sentinels: int = 512  # <mask:i>, metaseq's <sentinel:i> (CM3 infilling)
    num_task_tokens: int = 64  # <task:i>, room for instruction-tuning task tokens

    pad: ClassVar[int] = 0
    eod: ClassVar[int] = 1  # end of document; also opens a training sequence
    break_: ClassVar[int] = 2  # every modality transition (metaseq <racm3:break>)
    eoss: ClassVar[int] = 3  # end of an infilled span
    num_special: ClassVar[int] = len(SPECIAL_NAMES)

    def __post_init__(self) -> None:
        for name, minimum in (("text_vocab_size", 1), ("image_vocab_size", 1), ("num_sentinels", 0),
                              ("num_task_tokens", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
            object.__setattr__(self, name, int(value))

    @property
    def task_offset(self) -> int:
        return self.num_special

    @property
    def sentinel_offset(self) -> int:
        return self.task_offset + self.num_task_tokens

    @property
    def text_offset(self) -> int:
        return self.sentinel_offset + self.num_sentinels

    @property
    def image_offset(self) -> int:
        return self.text_offset + self.text_vocab_size

    @property
    def size(self) -> int:
        return self.image_offset + self.image_vocab_size

    def task(self, i: int) -> int:
        return self.task_offset + _index(i, self.num_task_tokens, "task")

    def sentinel(self, i: int) -> int:
        return self.sentinel_offset + _index(i, self.num_sentinels, "sentinel")

    # The predicates work on an int (-> bool) or elementwise on a numpy array (-> bool array).
    def is_special(self, ids: int | np.ndarray) -> bool | np.ndarray:
        return (ids >= 0) & (ids < self.task_offset)

    def is_task(self, ids: int | np.ndarray) -> bool | np.ndarray:
        return (ids >= self.task_offset) & (ids < self.sentinel_offset)

    def is_sentinel(self, ids: int | np.ndarray) -> bool | np.ndarray:
        return (ids >= self.sentinel_offset) & (ids < self.text_offset)

    def is_text(self, ids: int | np.ndarray) -> bool | np.ndarray:
        return (ids >= self.text_offset) & (ids < self.image_offset)

    def is_image(self, ids: int | np.ndarray) -> bool | np.ndarray:
        return (ids >= self.image_offset) & (ids < self.size)

    def text_ids(self, bpe_ids: ArrayLike) -> list[int]:
        """BPE ids -> joint ids."""
        bpe = int_array(bpe_ids)
        _check_range(bpe, self.text_vocab_size, "bpe id")
        return (bpe + self.text_offset).tolist()

    def bpe_ids(self, ids: ArrayLike) -> list[int]:
        """Joint text ids -> BPE ids; raises on any non-text id."""
        joint = int_array(ids)
        self._require(joint, self.is_text, "text")
        return (joint - self.text_offset).tolist()

    def image_ids(self, codes: ArrayLike) -> np.ndarray:
        """VQ codes (any shape) -> joint ids (same shape, int64)."""
        codes = int_array(codes)
        _check_range(codes, self.image_vocab_size, "image code")
        return codes + self.image_offset

    def codes_from_ids(self, ids: ArrayLike) -> np.ndarray:
        """Joint image ids (any shape) -> VQ codes (same shape, int64); raises on any non-image id."""
        joint = int_array(ids)
        self._require(joint, self.is_image, "image")
        return joint - self.image_offset

    def token_name(self, token_id: int) -> str:
        """Human-readable name, for debugging: <break>, <task:0>, <mask:3>, text:123, <img:17>."""
        i = int(token_id)
        if self.is_special(i):
            return SPECIAL_NAMES[i]
        if self.is_task(i):
            return f"<task:{i - self.task_offset}>"
        if self.is_sentinel(i):
            return f"<mask:{i - self.sentinel_offset}>"
        if self.is_text(i):
            return f"text:{i - self.text_offset}"
        if self.is_image(i):
            return f"<img:{i - self.image_offset}>"
        raise ValueError(f"id {i} is outside the vocabulary [0, {self.size})")

    # Layout: where sequences start and end and how images sit between text.

    @property
    def bos(self) -> int:
        """Opens every sequence."""
        return self.eod

    @property
    def eos(self) -> int:
        """Ends a document: where text generation stops."""
        return self.eod

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Where generated text ends."""
        return (self.eod,)

    @property
    def begin_image(self) -> int:
        """The last prompt token before image tokens are generated."""
        return self.break_

    @property
    def end_image(self) -> int:
        """The token that follows a generated image."""
        return self.break_

    @property
    def unconditional_fill(self) -> tuple[int, ...]:
        """What replaces the prompt's text in classifier-free guidance's unconditional stream (CM3: <mask:0>)."""
        return (self.sentinel(0),)

    def join(self, parts: Sequence[tuple[bool, Sequence[int]]]) -> list[int]:
        """(is_image, joint ids) parts as one sequence: a <break> at every transition between two parts."""
        ids: list[int] = []
        for i, (_, part) in enumerate(parts):
            ids += ([self.break_] if i else []) + list(part)
        return ids

    def document(self, text_ids: Sequence[int], image_codes: ArrayLike | None, order: Order = "caption_first"):
        """One document of joint text ids and one image's codes (`cm3.tokenizers.layout.encode_document`)."""
        from cm3.tokenizers.layout import encode_document  # layout builds on this module

        return encode_document(self, text_ids, image_codes, order)

    def image_id_table(self) -> np.ndarray:
        """The joint id of every VQ code, indexed by code."""
        return np.arange(self.image_offset, self.size, dtype=np.int64)

    def text_mask(self) -> np.ndarray:
        """bool [size]: which ids are text (what captioning may write)."""
        return self.is_text(np.arange(self.size))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        """cm3's vocabulary from its dict (see `vocabulary_from_dict` for either kind)."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict):
            raise ValueError(f"a vocabulary must be a dict, got {type(data).__name__}")
        if unknown := sorted(set(data) - names):
            raise ValueError(f"unknown vocabulary field(s): {unknown}")
        if missing := sorted({"text_vocab_size", "image_vocab_size"} - set(data)):
            raise ValueError(f"missing vocabulary field(s): {missing}")
        return cls(**data)

    def _require(self, ids: np.ndarray, predicate, kind: str) -> None:
        bad = np.flatnonzero(~predicate(ids))
        if bad.size:
            position = int(bad[0])
            raise ValueError(f"expected only {kind} ids, got {self.describe(int(ids.flat[position]))} "
                             f"at position {position} ({bad.size} non-{kind} id(s) in all)")

    def describe(self, token_id: int) -> str:
        try:
            return f"{token_id} ({self.token_name(token_id)})"
        except ValueError:
            return f"{token_id} (outside the vocabulary)"


def _index(i: int, count: int, kind: str) -> int:
    if not 0 <= i < count:
        raise ValueError(f"{kind} index must be in [0, {count}), got {i}")
    return int(i)


def int_array(values: ArrayLike) -> np.ndarray:
    """Ids as an int64 array; anything but integers is refused."""
    array = np.asarray(values)
    if array.size == 0:
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"expected integer ids, got dtype {array.dtype}")
    return array.astype(np.int64)


def _check_range(values: np.ndarray, count: int, kind: str) -> None:
    bad = np.flatnonzero((values < 0) | (values >= count))
    if bad.size:
        raise ValueError(f"{kind} {int(values.flat[bad[0]])} is outside [0, {count})")


def vocabulary_from_dict(data: dict):
    """A `Vocabulary`, or a `ChameleonVocabulary` for a dict of kind "chameleon" (its `to_dict`)."""
    if isinstance(data, dict) and data.get("kind") is not None:
        from cm3.tokenizers.chameleon import ChameleonVocabulary

        return ChameleonVocabulary.from_dict(data)
    return Vocabulary.from_dict(data)


# Chameleon's joint vocabulary size. CM3Leon's BPE has 56,320 tokens (the paper); the default vocabulary fills
# 65,536 exactly with 8,192 image codes and the specials, so `CM3()` and its image call agree on every id.
DEFAULT_VOCAB_SIZE = 65_536
DEFAULT_VOCABULARY = Vocabulary(text_vocab_size=DEFAULT_VOCAB_SIZE - 8192 - Vocabulary(1, 1).text_offset,
                                image_vocab_size=8192)
