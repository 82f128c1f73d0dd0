"""The byte-level BPE: training, exact round trips, persistence, foreign tokenizer.json, Parquet shards."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3.synthetic.shapes import iter_dataset
from cm3.tokenizers.text import TextTokenizer, train_from_shards
from tokenizers import pre_tokenizers

CAPTIONS = [spec.caption for _, spec in iter_dataset(600)]

# Arbitrary unicode (no lone surrogates: they cannot be UTF-8 encoded), weighted towards the hard parts.
TEXTS = st.text(
    alphabet=st.one_of(
        st.characters(exclude_categories=("Cs",)),
        st.sampled_from(list(" \t\n\r\x00\u00a0\u3000") + ["🌍", "👩", "\u200d", "👧", "é", "ß", "中", "\u0301"]),
    ),
    max_size=60,
)


@pytest.fixture(scope="module")
def bpe() -> TextTokenizer:
    return TextTokenizer.train(CAPTIONS, vocab_size=400)


def test_vocab_size_is_respected_and_captions_compress(bpe):
    assert 256 < bpe.vocab_size <= 400
    assert TextTokenizer.train(CAPTIONS, vocab_size=260).vocab_size <= 260
    caption = CAPTIONS[0]
    assert len(bpe.encode(caption)) < len(caption.encode()) / 3
    assert all(0 <= i < bpe.vocab_size for i in bpe.encode(caption + " 🌍"))


@settings(max_examples=300, deadline=None)
@given(text=TEXTS)
def test_round_trip_is_exact_for_any_unicode(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.encode_batch([text, CAPTIONS[1]]) == [ids, bpe.encode(CAPTIONS[1])]


def test_save_and_load_give_identical_ids(bpe, tmp_path):
    bpe.save(tmp_path / "tokenizer.json")
    loaded = TextTokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.vocab_size == bpe.vocab_size
    assert loaded.encode_batch(CAPTIONS) == bpe.encode_batch(CAPTIONS)


def test_bad_arguments_and_an_empty_corpus_are_refused():
    with pytest.raises(ValueError, match="empty corpus"):
        TextTokenizer.train([], vocab_size=300)
    with pytest.raises(ValueError, match="vocab_size"):
        TextTokenizer.train(CAPTIONS, vocab_size=100)


def _byte_level(pre: str) -> dict:
    return {"type": pre, "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def test_loads_a_gpt2_style_tokenizer_json_written_elsewhere(tmp_path):
    """A hand-written GPT-2 layout: 256 byte symbols, merges, and an added <|endoftext|>."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = ["h e", "l l", "he ll", "hell o"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    eot = len(vocab)
    document = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": eot, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": True, "special": True}],
        "normalizer": None, "pre_tokenizer": _byte_level("ByteLevel"),
        "post_processor": _byte_level("ByteLevel"), "decoder": _byte_level("ByteLevel"),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": merges},
    }
    path = tmp_path / "gpt2" / "tokenizer.json"
    path.parent.mkdir()
    path.write_text(json.dumps(document))

    gpt2 = TextTokenizer.from_file(path)
    assert gpt2.vocab_size == 256 + len(merges) + 1
    assert gpt2.encode("hello hello") == [vocab["hello"], vocab["Ġ"], vocab["hello"]]
    assert gpt2.encode("hi<|endoftext|>") == [vocab["h"], vocab["i"], eot]
    for text in ["hello, wörld 🌍\n", "hi<|endoftext|>"]:
        assert gpt2.decode(gpt2.encode(text)) == text


def _write_shard(path, captions, rows_per_group=7):
    table = pa.table({"key": [f"{i:05d}" for i in range(len(captions))], "caption": captions})
    pq.write_table(table, path, row_group_size=rows_per_group)


def test_train_from_shards_reads_captions_and_skips_nulls(tmp_path):
    first, second = CAPTIONS[:300], CAPTIONS[300:]
    _write_shard(tmp_path / "00000.parquet", [None if i % 5 == 0 else c for i, c in enumerate(first)])
    _write_shard(tmp_path / "00001.parquet", second)
    kept = [c for i, c in enumerate(first) if i % 5] + second

    from_folder = train_from_shards(tmp_path, vocab_size=300)
    from_list = train_from_shards([tmp_path / "00000.parquet", tmp_path / "00001.parquet"], vocab_size=300)
    direct = TextTokenizer.train(kept, vocab_size=300)
    assert from_folder.tokenizer.get_vocab() == from_list.tokenizer.get_vocab() == direct.tokenizer.get_vocab()
    assert from_folder.encode_batch(CAPTIONS[:50]) == direct.encode_batch(CAPTIONS[:50])


def test_train_from_shards_errors_are_clear(tmp_path):
    _write_shard(tmp_path / "00000.parquet", [None, None, ""])
    with pytest.raises(ValueError, match="no captions in column 'caption'"):
        train_from_shards(tmp_path, vocab_size=300)
    with pytest.raises(ValueError, match="no column 'TEXT'"):
        train_from_shards(tmp_path, vocab_size=300, caption_column="TEXT")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no captions"):
        train_from_shards(empty, vocab_size=300)
    with pytest.raises(FileNotFoundError):
        train_from_shards(tmp_path / "missing", vocab_size=300)
