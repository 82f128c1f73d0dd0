"""The CM3 objective on random multi-document sequences built with the real Vocabulary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3.model.objective import cm3_inverse, cm3_loss, cm3_transform, mask_spans
from cm3.tokenizers.vocabulary import Vocabulary

VOCAB = Vocabulary(text_vocab_size=50, image_vocab_size=40, num_sentinels=8, num_task_tokens=2)
text = st.lists(st.integers(VOCAB.text_offset, VOCAB.image_offset - 1), min_size=1, max_size=30)
image = st.lists(st.integers(VOCAB.image_offset, VOCAB.size - 1), min_size=16, max_size=16)


@st.composite
def document(draw) -> list[int]:
    """text, image, `text <break> image` or `image <break> text` (the layouts `encode_document` writes)."""
    parts = draw(st.sampled_from(["text", "image", "caption_first", "image_first"]))
    if parts in ("text", "image"):
        return draw(text if parts == "text" else image)
    first, second = (text, image) if parts == "caption_first" else (image, text)
    return draw(first) + [VOCAB.break_] + draw(second)


@st.composite
def sequence(draw) -> list[int]:
    """`<eod> doc <eod> doc ... <eod>`, sometimes padded at the end."""
    ids = [VOCAB.eod]
    for doc in draw(st.lists(document(), min_size=1, max_size=4)):
        ids += doc + [VOCAB.eod]
    return ids + [VOCAB.pad] * draw(st.integers(0, 3))


def placeholder_targets(t) -> np.ndarray:
    """Independent of the implementation: target positions whose label is a body <mask:i>."""
    appended = sum(end - start + 2 for start, end, _ in t.spans)
    body_len = len(t.ids) - appended
    return np.array([pos - 1 for pos in range(1, body_len) if VOCAB.is_sentinel(t.ids[pos])], dtype=np.int64)


@settings(max_examples=150, deadline=None)
@given(ids=sequence(), seed=st.integers(0, 2**32 - 1), lam=st.sampled_from([1.0, 3.0]))
def test_untruncated_transform_is_invertible_and_well_formed(ids, seed, lam):
    t = cm3_transform(ids, VOCAB, np.random.default_rng(seed), max_len=len(ids) + 3 * 7, poisson_lambda=lam)
    source = np.array(ids)
    assert t.source_len == len(ids)
    np.testing.assert_array_equal(cm3_inverse(t.ids, VOCAB), source)
    assert t.ids.dtype == np.int64 and len(t.ids) == len(ids) + 3 * len(t.spans)
    for start, end, i in t.spans:  # spans hold only text/image ids: never a <break>, <eod>, <pad>
        assert (VOCAB.is_text(source[start:end]) | VOCAB.is_image(source[start:end])).all()
        run = source[start:end]
        assert VOCAB.is_text(run).all() or VOCAB.is_image(run).all()  # never across a modality
    assert [i for _, _, i in t.spans] == list(range(len(t.spans)))
    assert all(e1 <= s2 for (_, e1, _), (s2, _, _) in zip(t.spans, t.spans[1:]))


@settings(max_examples=150, deadline=None)
@given(ids=sequence(), seed=st.integers(0, 2**32 - 1), max_len=st.integers(1, 120))
def test_transform_fits_max_len_and_weights_only_skip_placeholders_and_pad(ids, seed, max_len):
    t = cm3_transform(ids, VOCAB, np.random.default_rng(seed), max_len=max_len, poisson_lambda=2.0)
    assert 1 <= len(t.ids) <= max_len
    np.testing.assert_array_equal(cm3_inverse(t.ids, VOCAB), np.array(ids[: t.source_len]))
    assert t.loss_weights.dtype == np.float32 and len(t.loss_weights) == len(t.ids) - 1
    expected = np.ones(len(t.ids) - 1, np.float32)
    expected[placeholder_targets(t)] = 0.0
    expected[t.ids[1:] == VOCAB.pad] = 0.0
    np.testing.assert_array_equal(t.loss_weights, expected)
    for start, end, i in t.spans:  # the appended <mask:i> is a target like any other
        tail_pos = len(t.ids) - sum(e - s + 2 for s, e, _ in t.spans[i:])
        assert t.ids[tail_pos] == VOCAB.sentinel(i) and t.loss_weights[tail_pos - 1] == 1.0


@settings(max_examples=50, deadline=None)
@given(ids=sequence(), seed=st.integers(0, 2**32 - 1))
def test_same_seed_same_transform(ids, seed):
    a = cm3_transform(ids, VOCAB, np.random.default_rng(seed), max_len=64, poisson_lambda=2.0)
    b = cm3_transform(ids, VOCAB, np.random.default_rng(seed), max_len=64, poisson_lambda=2.0)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.loss_weights, b.loss_weights)
    assert a.spans == b.spans


@settings(max_examples=50, deadline=None)
@given(ids=sequence(), max_len=st.integers(1, 200))
def test_no_spans_is_plain_causal_lm(ids, max_len):
    t = cm3_transform(ids, VOCAB, np.random.default_rng(0), max_len=max_len, poisson_lambda=0.0)
    np.testing.assert_array_equal(t.ids, np.array(ids[:max_len]))
    assert t.spans == [] and t.source_len == min(len(ids), max_len)
    np.testing.assert_array_equal(t.loss_weights, (t.ids[1:] != VOCAB.pad).astype(np.float32))


def test_a_seed_drawing_k0_returns_the_input():
    ids = [VOCAB.eod, *range(VOCAB.text_offset, VOCAB.text_offset + 20), VOCAB.eod]
    seed = next(s for s in range(100) if np.random.default_rng(s).poisson(1.0) == 0)
    t = cm3_transform(ids, VOCAB, np.random.default_rng(seed), max_len=100)
    np.testing.assert_array_equal(t.ids, ids)


def test_number_of_spans_follows_poisson_one():
    """A long single run: P(no span) = P(k=0) = 1/e; with k >= 2 overlapping candidates may be dropped."""
    ids = list(range(VOCAB.text_offset, VOCAB.text_offset + 50)) * 4
    counts = np.array([len(cm3_transform(ids, VOCAB, np.random.default_rng(s), max_len=300).spans)
                       for s in range(1000)])
    assert (counts == 0).mean() == pytest.approx(math.exp(-1), abs=0.05)
    assert 0.75 < counts.mean() <= 1.0


def test_the_papers_chameleon_example():
    """"Image of a chameleon: [image]" -> "Image of <mask:0>: [image] <mask:0> a chameleon <eoss>"."""
    image_of, a_chameleon, colon = VOCAB.text_ids([7, 8]), VOCAB.text_ids([9, 10]), VOCAB.text_ids([11])
    img = VOCAB.image_ids(np.arange(16)).tolist()
    ids = image_of + a_chameleon + colon + [VOCAB.break_] + img
    t = mask_spans(ids, [(2, 4)], VOCAB)
    m0 = VOCAB.sentinel(0)
    assert t.ids.tolist() == image_of + [m0] + colon + [VOCAB.break_] + img + [m0] + a_chameleon + [VOCAB.eoss]
    assert t.spans == [(2, 4, 0)]
    assert t.loss_weights.tolist() == [1.0, 0.0] + [1.0] * (len(t.ids) - 3)
    np.testing.assert_array_equal(cm3_inverse(t.ids, VOCAB), ids)


def test_bad_inputs_raise():
    words = VOCAB.text_ids([1, 2, 3])
    with pytest.raises(ValueError, match="never across"):
        mask_spans(words + [VOCAB.break_] + words, [(1, 5)], VOCAB)
    with pytest.raises(ValueError, match="sorted, disjoint"):
        mask_spans(words, [(1, 3), (0, 2)], VOCAB)
    with pytest.raises(ValueError, match="already holds <mask"):
        cm3_transform(words + [VOCAB.sentinel(0)], VOCAB, np.random.default_rng(0), max_len=10)
    with pytest.raises(ValueError, match=r"ids must be in \[0"):
        cm3_transform([VOCAB.size], VOCAB, np.random.default_rng(0), max_len=10)
    with pytest.raises(ValueError, match="no closing <eoss>"):
        cm3_inverse(mask_spans(words, [(0, 2)], VOCAB).ids[:-1], VOCAB)


def test_loss_ignores_zero_weight_targets():
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    ones = torch.ones(2, 5)
    plain = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(cm3_loss(logits, targets, ones), plain)
    weights = ones.clone()
    weights[0, 2] = 0.0
    changed = logits.clone()
    changed[0, 2] = 100 * torch.randn(11)
    torch.testing.assert_close(cm3_loss(changed, targets, weights), cm3_loss(logits, targets, weights))
    assert cm3_loss(logits, targets, torch.zeros(2, 5)).item() == 0.0
