"""Byte-level BPE for captions, on Hugging Face `tokenizers`.

Byte-level so that every unicode string round-trips exactly (no unknown token, no
normalisation). The BPE holds no special tokens: those live in the joint vocabulary
(`cm3.tokenizers.vocabulary`), which offsets these ids into one id space with the images.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cm3.core.errors import InputError
from cm3.core.files import PathLike, atomic_write
from cm3.core.intact import load_json

BYTE_ALPHABET_SIZE = 256
SHARD_BATCH_ROWS = 8192  # captions read from a Parquet shard at a time


class TextTokenizer:
    """A thin, typed wrapper around one `tokenizers.Tokenizer`; ids are the BPE's own (not offset)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
        """Learn a byte-level BPE of at most ``vocab_size`` tokens (fewer when the corpus runs out of merges)."""
        if vocab_size < BYTE_ALPHABET_SIZE:
            raise ValueError(f"vocab_size must be at least {BYTE_ALPHABET_SIZE} (the byte alphabet), got {vocab_size}")
        texts = iter(texts)
        first = next(texts, None)
        if first is None:
            raise ValueError("cannot train a text tokenizer on an empty corpus")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tokenizer.train_from_iterator(itertools.chain([first], texts), trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: PathLike) -> TextTokenizer:
        """Load any `tokenizer.json` (ours, or e.g. GPT-2's); a damaged file is an InputError naming it."""
        load_json(path)
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as err:  # the Rust library raises a bare Exception
            raise InputError(f"{path}: not a tokenizers BPE file ({err})") from err

    def save(self, path: PathLike) -> None:
        atomic_write(path, lambda staged: self.tokenizer.save(str(staged)))

    @property
    def vocab_size(self) -> int:
        """Number of ids this tokenizer can emit (added tokens included), i.e. max id + 1."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Many texts at once, in parallel in Rust; offsets are not computed (`encode_batch_fast`)."""
        return [e.ids for e in self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def shard_paths(paths_or_folder: PathLike | Iterable[PathLike]) -> list[Path]:
    """A folder means its `*.parquet` files (not recursive, so in-progress `_tmp/` writes are skipped)."""
    if isinstance(paths_or_folder, (str, os.PathLike)):
        root = Path(paths_or_folder)
        if root.is_dir():
            return sorted(root.glob("*.parquet"))
        if not root.exists():
            raise FileNotFoundError(f"no such shard file or folder: {root}")
        return [root]
    return [Path(p) for p in paths_or_folder]


def iter_captions(paths: Iterable[Path], caption_column: str = "caption") -> Iterator[list[str]]:
    """Non-empty captions, one Parquet record batch at a time, so memory stays at one batch."""
    for path in paths:
        shard = pq.ParquetFile(path)
        if caption_column not in shard.schema_arrow.names:
            raise ValueError(f"{path}: no column {caption_column!r} (columns: {shard.schema_arrow.names})")
        for batch in shard.iter_batches(batch_size=SHARD_BATCH_ROWS, columns=[caption_column]):
            captions = [c for c in batch.column(0).to_pylist() if c]
            if captions:
                yield captions


def train_from_shards(
    paths_or_folder: PathLike | Iterable[PathLike],
    vocab_size: int,
    caption_column: str = "caption",
    min_frequency: int = 2,
) -> TextTokenizer:
    """Train the BPE on the captions of raw Parquet shards (`cm3 ingest` output), skipping null ones."""
    paths = shard_paths(paths_or_folder)
    batches = iter_captions(paths, caption_column)
    first = next(batches, None)
    if first is None:
        where = f" under {paths_or_folder}" if isinstance(paths_or_folder, (str, os.PathLike)) else ""
        raise ValueError(f"no captions in column {caption_column!r} of {len(paths)} Parquet shard(s){where}")
    texts = itertools.chain.from_iterable(itertools.chain([first], batches))
    return TextTokenizer.train(texts, vocab_size, min_frequency)
