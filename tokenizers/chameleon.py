"""Chameleon's (and Anole's) joint vocabulary, read from its own BPE `tokenizer.json`.

Chameleon keeps text and image tokens in one BPE: the ids a converted checkpoint reads are the BPE's ids, the
8,192 image tokens are named `IMGIMG<digits>Z` with digits written as letters (A=0 ... J=9, e.g. IMGIMGBAZ is
VQ code 10) and are not the vocabulary's last ids, an image is wrapped in `<racm3:break>` ... `<eoss>`, and a
sequence opens with `<s>` and ends with `</s>`. `ChameleonVocabulary` answers the layout questions that
`Vocabulary` answers for cm3's own layout (see tokenizers/vocabulary.py), so generation, captioning and SFT
layouts run unchanged on either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

IMAGE_PREFIX = "IMGIMG"
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
BEGIN_IMAGE, END_IMAGE = "<racm3:break>", "<eoss>"
END_TURN = "<reserved08706>"  # Chameleon's end of a chat turn: captioning stops there too
KIND = "chameleon"


def image_code(name: str) -> int:
    """VQ code of an image token name: IMGIMG + the code's digits as letters A-J + one closing letter."""
    digits = name[len(IMAGE_PREFIX):-1]
    if not digits or any(not "A" <= c <= "J" for c in digits):
        raise ValueError(f"image token {name!r} is not IMGIMG<digits as A-J><letter>")
    return int("".join(str(ord(c) - ord("A")) for c in digits))


class ChameleonVocabulary:
    """Ids as Chameleon numbers them; `names` maps every token name to its id (the BPE's vocabulary)."""

    num_sentinels = 0  # no <mask:i>: CM3's infilling objective does not apply (train with --no-cm3)

    def __init__(self, names: Mapping[str, int], size: int | None = None):
        ids = {name: int(i) for name, i in names.items()}
        self.size = int(size if size is not None else max(ids.values()) + 1)
        missing = [t for t in (BOS, EOS, PAD, BEGIN_IMAGE, END_IMAGE) if t not in ids]
        if missing:
            raise ValueError(f"not a Chameleon vocabulary: no token(s) {missing}")
        self.bos, self.eos, self.pad = ids[BOS], ids[EOS], ids[PAD]
        self.begin_image, self.end_image = ids[BEGIN_IMAGE], ids[END_IMAGE]
        self.stop_ids = (self.eos, *([ids[END_TURN]] if END_TURN in ids else []))
        images = sorted((image_code(name), i) for name, i in ids.items() if name.startswith(IMAGE_PREFIX))
        codes = [code for code, _ in images]
        if codes != list(range(len(codes))) or not codes:
            raise ValueError(f"the {IMAGE_PREFIX}* tokens must name the codes 0..N-1 once each; got {len(codes)} "
                             f"tokens for codes {codes[:3]}...{codes[-3:]}")
        self._table = np.array([i for _, i in images], dtype=np.int64)
        if self._table.max() >= self.size:
            raise ValueError(f"image token id {int(self._table.max())} is outside the vocabulary [0, {self.size})")
        self._code_of = np.full(self.size, -1, dtype=np.int64)
        self._code_of[self._table] = np.arange(len(self._table))
        special = np.zeros(self.size, dtype=bool)
        special[[i for name, i in ids.items() if name.startswith("<") and name != "<" and i < self.size]] = True
        named = np.zeros(self.size, dtype=bool)
        named[[i for i in ids.values() if i < self.size]] = True
        self._text = named & ~special & (self._code_of < 0)
        self._names = {i: name for name, i in ids.items()}

    @classmethod
    def from_text_tokenizer(cls, text, size: int | None = None) -> ChameleonVocabulary:
        """From a `TextTokenizer` holding Chameleon's tokenizer.json (added tokens included)."""
        return cls(text.tokenizer.get_vocab(with_added_tokens=True), size)

    @property
    def image_vocab_size(self) -> int:
        return len(self._table)

    @property
    def text_vocab_size(self) -> int:
        """The BPE's own size: its ids are the joint ids."""
        return self.size

    @property
    def unconditional_fill(self) -> tuple[int, ...]:
        return ()  # Chameleon's unconditional stream is `<s> <racm3:break>`

    def is_image(self, ids: int | np.ndarray) -> bool | np.ndarray:
        ids = np.asarray(ids)
        inside = (ids >= 0) & (ids < self.size)
        return inside & (self._code_of[np.where(inside, ids, 0)] >= 0)

    def is_text(self, ids: int | np.ndarray) -> bool | np.ndarray:
        ids = np.asarray(ids)
        inside = (ids >= 0) & (ids < self.size)
        return inside & self._text[np.where(inside, ids, 0)]

    def text_mask(self) -> np.ndarray:
        return self._text.copy()

    def image_id_table(self) -> np.ndarray:
        return self._table.copy()

    def text_ids(self, bpe_ids: ArrayLike) -> list[int]:
        """The BPE's ids are already joint ids: checked to be text, returned as they are."""
        return self._require(bpe_ids, self.is_text, "text").tolist()

    def bpe_ids(self, ids: ArrayLike) -> list[int]:
        return self.text_ids(ids)

    def image_ids(self, codes: ArrayLike) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= len(self._table)):
            raise ValueError(f"image code outside [0, {len(self._table)})")
        return self._table[codes]

    def codes_from_ids(self, ids: ArrayLike) -> np.ndarray:
        ids = self._require(ids, self.is_image, "image")
        return self._code_of[ids]

    def join(self, parts: Sequence[tuple[bool, Sequence[int]]]) -> list[int]:
        """Text parts as they are, each image wrapped in `<racm3:break>` ... `<eoss>`."""
        ids: list[int] = []
        for is_image, part in parts:
            ids += [self.begin_image, *part, self.end_image] if is_image else list(part)
        return ids

    def document(self, text_ids: Sequence[int], image_codes: ArrayLike | None, order: str = "caption_first"):
        self.text_ids(list(text_ids))
        if image_codes is None:
            return list(text_ids)
        parts = [(False, list(text_ids)), (True, self.image_ids(image_codes).reshape(-1).tolist())]
        return self.join(parts if order == "caption_first" else parts[::-1])

    def token_name(self, token_id: int) -> str:
        return self._names.get(int(token_id), f"<unnamed:{int(token_id)}>")

    def to_dict(self) -> dict:
        """What vocabulary.json and a training plan carry: kind, size and every token's name."""
        return {"kind": KIND, "size": self.size, "names": {name: i for i, name in self._names.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> ChameleonVocabulary:
        if data.get("kind") != KIND or not isinstance(data.get("names"), dict):
            raise ValueError(f"a Chameleon vocabulary needs kind {KIND!r} and names, got keys {sorted(data)}")
        return cls(data["names"], data.get("size"))

    def _require(self, ids: ArrayLike, predicate, kind: str) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        bad = np.flatnonzero(~predicate(ids))
        if bad.size:
            raise ValueError(f"expected only {kind} ids, got {int(ids.flat[bad[0]])} at position {int(bad[0])} "
                             f"({bad.size} non-{kind} id(s) in all)")
        return ids
