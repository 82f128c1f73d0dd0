"""The joint vocabulary, the document layout, and the saved multimodal tokenizer artefact."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3.synthetic.shapes import iter_dataset, render, spec_for
from cm3.tokenizers.layout import decode_document, encode_document
from cm3.tokenizers.multimodal import MultimodalTokenizer
from cm3.tokenizers.text import TextTokenizer
from cm3.tokenizers.vocabulary import Vocabulary
from cm3.tokenizers.vqgan import VQGAN, VQGANConfig

# --- Vocabulary ---------------------------------------------------------------------------------


def test_layout_is_specials_tasks_masks_text_images_contiguous():
    vocab = Vocabulary(text_vocab_size=1000, image_vocab_size=8192)
    assert (vocab.pad, vocab.eod, vocab.break_, vocab.eoss) == (0, 1, 2, 3)
    assert (vocab.task(0), vocab.task(63)) == (4, 67)
    assert (vocab.sentinel(0), vocab.sentinel(511)) == (68, 579)
    assert (vocab.text_offset, vocab.image_offset, vocab.size) == (580, 1580, 1580 + 8192)

    ids = np.arange(vocab.size)
    ranges = [vocab.is_special(ids), vocab.is_task(ids), vocab.is_sentinel(ids), vocab.is_text(ids),
              vocab.is_image(ids)]
    assert (np.sum(ranges, axis=0) == 1).all()  # every id in exactly one range
    firsts = [int(np.flatnonzero(r)[0]) for r in ranges]
    lasts = [int(np.flatnonzero(r)[-1]) for r in ranges]
    assert firsts == [0, 4, 68, 580, 1580] and [f - 1 for f in firsts[1:]] == lasts[:-1]
    assert not vocab.is_image(vocab.size) and not vocab.is_special(-1)

    names = [vocab.token_name(i) for i in (2, 4, 68 + 3, 580 + 123, 1580 + 17)]
    assert names == ["<break>", "<task:0>", "<mask:3>", "text:123", "<img:17>"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.token_name(vocab.size)
    with pytest.raises(ValueError, match="sentinel index"):
        vocab.sentinel(512)


def test_id_conversions_round_trip_and_check_ranges():
    vocab = Vocabulary(text_vocab_size=50, image_vocab_size=16, num_sentinels=4, num_task_tokens=2)
    codes = np.arange(16).reshape(4, 4)
    ids = vocab.image_ids(codes)
    assert ids.shape == (4, 4) and vocab.is_image(ids).all()
    np.testing.assert_array_equal(vocab.codes_from_ids(ids), codes)
    assert vocab.bpe_ids(vocab.text_ids([0, 7, 49])) == [0, 7, 49]
    with pytest.raises(ValueError, match="image code 16"):
        vocab.image_ids([16])
    with pytest.raises(ValueError, match="bpe id 50"):
        vocab.text_ids([50])
    with pytest.raises(ValueError, match=r"expected only image ids.*<break>"):
        vocab.codes_from_ids([ids[0, 0], vocab.break_])
    with pytest.raises(ValueError, match=r"expected only text ids.*<img:0>"):
        vocab.bpe_ids([vocab.text_offset, vocab.image_offset])


@pytest.mark.parametrize("kwargs, field", [
    ({"text_vocab_size": 0, "image_vocab_size": 8}, "text_vocab_size"),
    ({"text_vocab_size": 8, "image_vocab_size": -1}, "image_vocab_size"),
    ({"text_vocab_size": 8, "image_vocab_size": 8, "num_sentinels": -1}, "num_sentinels"),
    ({"text_vocab_size": 8, "image_vocab_size": 8, "num_task_tokens": 1.5}, "num_task_tokens"),
    ({"text_vocab_size": True, "image_vocab_size": 8}, "text_vocab_size"),
])
def test_invalid_sizes_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Vocabulary(**kwargs)


def test_dict_round_trip_and_errors():
    vocab = Vocabulary(text_vocab_size=300, image_vocab_size=64, num_sentinels=8, num_task_tokens=0)
    assert Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab
    with pytest.raises(ValueError, match="unknown vocabulary field"):
        Vocabulary.from_dict({**vocab.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="image_vocab_size"):
        Vocabulary.from_dict({"text_vocab_size": 300})


# --- documents -----------------------------------------------------------------------------------


@st.composite
def documents(draw):
    vocab = Vocabulary(text_vocab_size=draw(st.integers(1, 40)), image_vocab_size=draw(st.integers(1, 40)),
                       num_sentinels=draw(st.integers(0, 6)), num_task_tokens=draw(st.integers(0, 3)))
    tokens_per_image = draw(st.integers(1, 12))
    bpe = draw(st.lists(st.integers(0, vocab.text_vocab_size - 1), max_size=20))
    codes = draw(st.none() | st.lists(st.integers(0, vocab.image_vocab_size - 1), min_size=tokens_per_image,
                                      max_size=tokens_per_image).map(np.array))
    order = draw(st.sampled_from(["caption_first", "image_first"]))
    return vocab, tokens_per_image, vocab.text_ids(bpe), codes, order


@settings(max_examples=300, deadline=None)
@given(documents())
def test_document_round_trip_is_exact(case):
    vocab, tokens_per_image, text_ids, codes, order = case
    if not text_ids and codes is None:
        with pytest.raises(ValueError, match="neither"):
            encode_document(vocab, text_ids, codes, order)
        return
    ids = encode_document(vocab, text_ids, codes, order)
    doc = decode_document(vocab, ids, tokens_per_image)
    assert doc.text_ids == text_ids
    if codes is None:
        assert doc.image_codes is None and doc.order is None and vocab.break_ not in ids
    else:
        assert doc.image_codes.dtype == np.int64
        np.testing.assert_array_equal(doc.image_codes, codes)
        assert doc.order == (order if text_ids else None)
        assert ids.count(vocab.break_) == (1 if text_ids else 0)
        assert vocab.is_text(ids[0]) == (bool(text_ids) and order == "caption_first")


VOCAB = Vocabulary(text_vocab_size=10, image_vocab_size=10, num_sentinels=2, num_task_tokens=1)
T = VOCAB.text_ids([1, 2, 3])
I = VOCAB.image_ids([4, 5, 6, 7]).tolist()  # one image of 4 tokens
B = [VOCAB.break_]


@pytest.mark.parametrize("ids, message", [
    ([], "empty"),
    (T + B + I[:3], "holds 3 image tokens; one image is 4"),
    (I + I + B + T, "holds 8 image tokens"),
    (I[:2], "holds 2 image tokens"),
    (T + B + I + B + T, "at most one <break>"),
    (B + T, "two non-empty parts"),
    (T + B, "two non-empty parts"),
    (T + I, "should be all text"),
    (I + T, "should be one image"),
    (T + B + T, "should be one image"),
    (I + B + I, "should be all text"),
    (T[:1] + I[:1] + T + B + I, "should be all text"),
    ([VOCAB.eod] + T + B + I, r"unexpected token 1 \(<eod>\) at position 0"),
    (T + [VOCAB.sentinel(1)] + B + I, r"<mask:1>"),
    (T + B + I[:3] + [VOCAB.size], "outside the vocabulary"),
])
def test_malformed_documents_raise(ids, message):
    with pytest.raises(ValueError, match=message):
        decode_document(VOCAB, ids, tokens_per_image=4)


def test_encode_document_refuses_bad_input():
    with pytest.raises(ValueError, match="order"):
        encode_document(VOCAB, T, [1, 2, 3, 4], order="sideways")
    with pytest.raises(ValueError, match="expected only text ids"):
        encode_document(VOCAB, [1, 2], None)  # BPE ids not yet offset into the joint space
    with pytest.raises(ValueError, match="image code 10"):
        encode_document(VOCAB, T, [10, 0, 0, 0])
    with pytest.raises(ValueError, match="empty"):
        encode_document(VOCAB, T, np.zeros(0, dtype=np.int64))


# --- the saved multimodal tokenizer --------------------------------------------------------------

RESOLUTION = 32  # fully convolutional, so a small render keeps the tests fast


def _image(index: int) -> torch.Tensor:
    pixels = np.asarray(render(spec_for(index), RESOLUTION), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0


@pytest.fixture(scope="module")
def tokenizer() -> MultimodalTokenizer:
    torch.manual_seed(0)
    config = VQGANConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=16,
                         embed_dim=16, n_embed=64, resolution=RESOLUTION, norm_groups=8)
    text = TextTokenizer.train([spec.caption for _, spec in iter_dataset(300)], vocab_size=300)
    return MultimodalTokenizer(text, VQGAN(config).eval())


def test_images_and_captions_map_into_their_ranges(tokenizer):
    vocab = tokenizer.vocab
    assert (vocab.text_vocab_size, vocab.image_vocab_size, tokenizer.tokens_per_image) == (
        tokenizer.text.vocab_size, 64, 64)
    images = torch.stack([_image(0), _image(1)])
    ids = tokenizer.encode_image(images)
    assert ids.shape == (2, 64) and ids.dtype == torch.long and vocab.is_image(ids.numpy()).all()
    assert tokenizer.decode_image(ids).shape == (2, 3, RESOLUTION, RESOLUTION)
    with pytest.raises(ValueError, match="expected only image ids"):
        tokenizer.decode_image(torch.cat([ids[:, :1] - 64, ids[:, 1:]], dim=1))

    caption = spec_for(0).caption
    caption_ids = tokenizer.encode_caption(caption)
    assert vocab.is_text(np.array(caption_ids)).all()
    assert tokenizer.encode_captions([caption]) == [caption_ids]
    generated = [vocab.eod] + caption_ids + [vocab.break_, ids[0, 0].item()]
    assert tokenizer.decode_text(generated) == caption
    with pytest.raises(ValueError, match="expected only text ids"):
        tokenizer.decode_text(generated, skip_special=False)


@pytest.mark.parametrize("order", ["caption_first", "image_first"])
def test_document_and_parse_round_trip(tokenizer, order):
    caption = spec_for(2).caption + " 🌍"
    codes = tokenizer.vq.encode(_image(2)[None])[0]
    ids = tokenizer.document(caption, codes, order)
    assert len(ids) == len(tokenizer.encode_caption(caption)) + 1 + 64
    parsed_caption, parsed_codes, parsed_order = tokenizer.parse(ids)
    assert (parsed_caption, parsed_order) == (caption, order)
    np.testing.assert_array_equal(parsed_codes, codes.numpy())
    assert tokenizer.parse(tokenizer.document(caption, None)) == (caption, None, None)
    with pytest.raises(ValueError, match="an image is 64 codes"):
        tokenizer.document(caption, codes[:2], order)


def test_save_and_load_give_identical_ids(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    assert sorted(os.listdir(tmp_path)) == ["tok"]
    assert {"vocabulary.json", "text", "vq"} <= set(os.listdir(tmp_path / "tok"))
    loaded = MultimodalTokenizer.load(tmp_path / "tok")
    assert loaded.vocab == tokenizer.vocab and loaded.tokens_per_image == tokenizer.tokens_per_image
    image = _image(5)[None]
    assert torch.equal(loaded.encode_image(image), tokenizer.encode_image(image))
    caption = spec_for(5).caption
    assert loaded.document(caption, loaded.vq.encode(image)[0]) == tokenizer.document(
        caption, tokenizer.vq.encode(image)[0])
    tokenizer.save(tmp_path / "tok")  # overwriting a saved artefact
    assert sorted(os.listdir(tmp_path)) == ["tok"]


@pytest.mark.parametrize("edit, field", [
    (lambda meta: meta["vocabulary"].update(image_vocab_size=65), "vocabulary.image_vocab_size"),
    (lambda meta: meta["vocabulary"].update(text_vocab_size=7), "vocabulary.text_vocab_size"),
    (lambda meta: meta.update(tokens_per_image=256), "tokens_per_image"),
    (lambda meta: meta["vocabulary"].update(num_sentinels=-2), "num_sentinels"),
    (lambda meta: meta.update(format_version=99), "format_version"),
])
def test_inconsistent_artefact_is_refused_naming_file_and_field(tokenizer, tmp_path, edit, field):
    tokenizer.save(tmp_path / "tok")
    path = tmp_path / "tok" / "vocabulary.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"vocabulary\.json.*{field}"):
        MultimodalTokenizer.load(tmp_path / "tok")


def test_a_killed_save_leaves_no_artefact(tokenizer, tmp_path, monkeypatch):
    def killed(directory):
        assert (directory.parent / "text" / "tokenizer.json").is_file()  # the text part was written
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer.vq, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        tokenizer.save(tmp_path / "tok")
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="vocabulary.json is missing"):
        MultimodalTokenizer.load(tmp_path / "tok")
    monkeypatch.undo()

    tokenizer.save(tmp_path / "tok")  # a killed overwrite keeps the previous artefact whole
    monkeypatch.setattr(tokenizer.vq, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        tokenizer.save(tmp_path / "tok")
    assert os.listdir(tmp_path) == ["tok"]
    assert MultimodalTokenizer.load(tmp_path / "tok").vocab == tokenizer.vocab
