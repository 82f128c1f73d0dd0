"""The multimodal tokenizer: BPE + VQ-GAN + joint vocabulary, saved and loaded as one folder.

This is the one artefact every later stage (ingest tokenization, training, generation) passes
around, so loading it checks that its three parts agree instead of failing deep inside a model.

Folder layout::

    text/tokenizer.json   the BPE (Hugging Face `tokenizers` format)
    vq/                   the VQ-GAN (`VQGAN.save_pretrained`)
    vocabulary.json       {"format_version", "vocabulary": {...}, "tokens_per_image"}
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from numpy.typing import ArrayLike

from cm3.core.files import PathLike, atomic_folder
from cm3.core.intact import load_json
from cm3.tokenizers.chameleon import ChameleonVocabulary
from cm3.tokenizers.layout import Order, decode_document
from cm3.tokenizers.text import TextTokenizer, train_from_shards
from cm3.tokenizers.vocabulary import Vocabulary, vocabulary_from_dict
from cm3.tokenizers.vqgan import VQGAN

FORMAT_VERSION = 1
TEXT_FILE = Path("text") / "tokenizer.json"
VQ_DIR = "vq"
VOCAB_FILE = "vocabulary.json"


class MultimodalTokenizer:
    """Text and images in, joint-space ids out, and back. The vocabulary is cm3's own layout (`Vocabulary`) or a
    converted Chameleon checkpoint's (`ChameleonVocabulary`, whose BPE ids are its joint ids)."""

    def __init__(self, text: TextTokenizer, vq: VQGAN, vocab: Vocabulary | ChameleonVocabulary | None = None):
        self.text = text
        self.vq = vq
        self.vocab = vocab or Vocabulary(text_vocab_size=text.vocab_size, image_vocab_size=vq.config.n_embed)
        if self.vocab.text_vocab_size != text.vocab_size:
            raise ValueError(f"text_vocab_size {self.vocab.text_vocab_size} != the text tokenizer's {text.vocab_size}")
        if self.vocab.image_vocab_size != vq.config.n_embed:
            raise ValueError(f"image_vocab_size {self.vocab.image_vocab_size} != the VQ-GAN's n_embed "
                             f"{vq.config.n_embed}")

    @property
    def tokens_per_image(self) -> int:
        return self.vq.config.tokens_per_image

    # text

    def encode_caption(self, caption: str) -> list[int]:
        return self.vocab.text_ids(self.text.encode(caption))

    def encode_captions(self, captions: Iterable[str]) -> list[list[int]]:
        return [self.vocab.text_ids(ids) for ids in self.text.encode_batch(captions)]

    def decode_text(self, ids: ArrayLike, skip_special: bool = True) -> str:
        """Joint ids -> text. ``skip_special`` drops every non-text id (a generated caption may hold
        <break>, <eod>, ...); otherwise any non-text id raises ValueError."""
        ids = _numpy(ids).reshape(-1)
        if skip_special:
            ids = ids[self.vocab.is_text(ids)]
        return self.text.decode(self.vocab.bpe_ids(ids))

    # images

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images float [B, 3, H, W] in [-1, 1] -> joint ids LongTensor [B, N] (on the VQ-GAN's device)."""
        codes = self.vq.encode(images).flatten(1)
        return torch.from_numpy(self.vocab.image_ids(codes.cpu().numpy())).to(codes.device)

    def decode_image(self, ids: torch.Tensor | ArrayLike) -> torch.Tensor:
        """Joint image ids [B, N] -> images float [B, 3, H, W] in [-1, 1]."""
        ids = _numpy(ids)
        if ids.ndim != 2 or ids.shape[1] != self.tokens_per_image:
            raise ValueError(f"expected image ids [B, {self.tokens_per_image}], got {list(ids.shape)}")
        codes = torch.from_numpy(self.vocab.codes_from_ids(ids))
        grid = self.vq.config.grid_size
        return self.vq.decode(codes.view(-1, grid, grid))

    # documents

    def document(self, caption: str | None, image_codes: ArrayLike | None, order: Order = "caption_first") -> list[int]:
        """One training document (see `encode_document`); ``image_codes`` are one image's VQ codes."""
        if image_codes is not None:
            image_codes = _numpy(image_codes)
            if image_codes.size != self.tokens_per_image:
                raise ValueError(f"an image is {self.tokens_per_image} codes, got {image_codes.size}")
        return self.vocab.document(self.encode_caption(caption or ""), image_codes, order)

    def parse(self, ids: ArrayLike) -> tuple[str, np.ndarray | None, Order | None]:
        """Inverse of `document`: (caption, codes [h, w] or None, order or None for one modality)."""
        doc = decode_document(self.vocab, _numpy(ids), self.tokens_per_image)
        grid = self.vq.config.grid_size
        codes = None if doc.image_codes is None else doc.image_codes.reshape(grid, grid)
        return self.text.decode(self.vocab.bpe_ids(doc.text_ids)), codes, doc.order

    # persistence

    def save(self, directory: PathLike) -> None:
        """Write the whole folder at once (``atomic_folder``), so that a save killed at any point leaves a whole
        artefact or none at ``directory``, never a partial one."""
        with atomic_folder(directory) as staging:
            (staging / TEXT_FILE).parent.mkdir()
            self.text.save(staging / TEXT_FILE)
            self.vq.save_pretrained(staging / VQ_DIR)
            meta = {"format_version": FORMAT_VERSION, "vocabulary": self.vocab.to_dict(),
                    "tokens_per_image": self.tokens_per_image}
            (staging / VOCAB_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: PathLike, device: str | torch.device = "cpu") -> MultimodalTokenizer:
        """Load a saved folder; ValueError naming the file and field when its parts disagree."""
        root = Path(directory)
        vocab_path = root / VOCAB_FILE
        if not vocab_path.is_file():
            raise FileNotFoundError(f"{root} is not a saved multimodal tokenizer: {vocab_path} is missing")
        meta = load_json(vocab_path)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{vocab_path}: format_version {meta.get('format_version')!r} is not "
                             f"{FORMAT_VERSION}, the one this code reads")
        try:
            vocab = vocabulary_from_dict(meta.get("vocabulary"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{vocab_path}: invalid vocabulary: {err}") from err
        text = TextTokenizer.from_file(root / TEXT_FILE)
        vq = VQGAN.from_pretrained(root / VQ_DIR, device=device)
        checks = (
            ("vocabulary.text_vocab_size", vocab.text_vocab_size, text.vocab_size, f"the vocab size of {TEXT_FILE}"),
            ("vocabulary.image_vocab_size", vocab.image_vocab_size, vq.config.n_embed, f"n_embed of {VQ_DIR}/"),
            ("tokens_per_image", meta.get("tokens_per_image"), vq.config.tokens_per_image,
             f"tokens_per_image of {VQ_DIR}/"),
        )
        for field, value, expected, source in checks:
            if value != expected:
                raise ValueError(f"{vocab_path}: {field} is {value!r} but {source} is {expected}")
        return cls(text, vq, vocab)


def _numpy(values: torch.Tensor | ArrayLike) -> np.ndarray:
    """Ids or codes as a numpy array, wherever a tensor lives (generation runs on the GPU)."""
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def build_tokenizer(raw_shards: PathLike | Iterable[PathLike], vq_dir: PathLike, vocab_size: int,
                    caption_column: str = "caption", device: str | torch.device = "cpu") -> MultimodalTokenizer:
    """Train the BPE on raw shards' captions and join it with a trained VQ-GAN."""
    text = train_from_shards(raw_shards, vocab_size, caption_column)
    return MultimodalTokenizer(text, VQGAN.from_pretrained(vq_dir, device=device))
