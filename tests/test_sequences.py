"""Training sequences: the paper's layout with retrieved documents, order mix, packing without splits."""

from __future__ import annotations

import numpy as np
import pytest

from cm3.model.objective import cm3_inverse
from cm3.model.sequences import SequenceConfig, example_ids, pack, packed_sequences, transformed_example
from cm3.tokenizers.vocabulary import Vocabulary

VOCAB = Vocabulary(text_vocab_size=100, image_vocab_size=32, num_sentinels=16, num_task_tokens=2)
TOKENS = 16


def row(i: int, neighbours: int = 2) -> dict:
    rng = np.random.default_rng(i)
    return {
        "text_ids": rng.integers(0, 100, size=5 + i % 3).tolist(),
        "image_ids": rng.integers(0, 32, size=TOKENS).tolist(),
        "neighbour_text_ids": [rng.integers(0, 100, size=4).tolist() for _ in range(neighbours)],
        "neighbour_image_ids": [rng.integers(0, 32, size=TOKENS).tolist() for _ in range(neighbours)],
    }


def test_example_layout_retrieved_documents_first():
    config = SequenceConfig(seq_len=256, image_first=0.0, cm3=False)
    r = row(0)
    ids = example_ids(r, VOCAB, config, np.random.default_rng(0))
    expected = [VOCAB.eod]
    for text, codes in zip(r["neighbour_text_ids"], r["neighbour_image_ids"]):
        expected += VOCAB.text_ids(text) + [VOCAB.break_] + VOCAB.image_ids(codes).tolist() + [VOCAB.break_]
    expected += VOCAB.text_ids(r["text_ids"]) + [VOCAB.break_] + VOCAB.image_ids(r["image_ids"]).tolist()
    assert ids == expected + [VOCAB.eod]


def test_image_first_order_puts_the_caption_after_the_image():
    config = SequenceConfig(seq_len=256, image_first=1.0, retrieved_min=0, retrieved_max=0, cm3=False)
    r = row(1)
    ids = example_ids(r, VOCAB, config, np.random.default_rng(0))
    assert ids == ([VOCAB.eod] + VOCAB.image_ids(r["image_ids"]).tolist() + [VOCAB.break_]
                   + VOCAB.text_ids(r["text_ids"]) + [VOCAB.eod])


def test_k_is_drawn_uniformly_and_orders_are_mixed():
    config = SequenceConfig(seq_len=256, retrieved_min=0, retrieved_max=2, image_first=0.5, cm3=False)
    rng = np.random.default_rng(0)
    counts, image_first = [], 0
    for i in range(300):
        ids = np.asarray(example_ids(row(i), VOCAB, config, rng))
        images = int(VOCAB.is_image(ids).sum()) // TOKENS
        counts.append(images - 1)
        image_first += bool(VOCAB.is_text(ids[-2]))  # the main document ends with its caption
    assert set(counts) == {0, 1, 2}
    assert abs(image_first / 300 - 0.5) < 0.1
    assert all(abs(counts.count(k) / 300 - 1 / 3) < 0.1 for k in (0, 1, 2))


def test_a_row_without_neighbours_is_a_plain_document():
    config = SequenceConfig(seq_len=256, cm3=False, image_first=0.0)
    r = row(2, neighbours=0)
    ids = example_ids(r, VOCAB, config, np.random.default_rng(0))
    assert int(VOCAB.is_image(np.asarray(ids)).sum()) == TOKENS


def test_cm3_examples_invert_to_the_plain_example_and_fit():
    config = SequenceConfig(seq_len=128, poisson_lambda=2.0)
    for seed in range(40):
        plain = example_ids(row(seed), VOCAB, config, np.random.default_rng(seed))
        ids, weights = transformed_example(row(seed), VOCAB, config, np.random.default_rng(seed))
        assert len(ids) <= config.seq_len + 1 and len(weights) == len(ids) - 1
        restored = cm3_inverse(ids, VOCAB).tolist()
        assert restored == plain[: len(restored)]


def test_packing_never_splits_an_example_and_pads_with_zero_weight():
    config = SequenceConfig(seq_len=100, retrieved_min=0, retrieved_max=1, cm3=False)
    windows = list(packed_sequences((row(i) for i in range(30)), VOCAB, config, np.random.default_rng(0)))
    assert len(windows) > 1
    seen_eods = 0
    for w in windows:
        assert w.inputs.shape == w.targets.shape == w.weights.shape == (100,)
        assert (w.inputs[1:] == w.targets[:-1]).all()
        assert w.inputs[0] == VOCAB.eod  # every window opens with a whole example
        assert (w.weights[w.targets == VOCAB.pad] == 0).all()
        seen_eods += int((np.concatenate([w.inputs[:1], w.targets]) == VOCAB.eod).sum())
    assert seen_eods == 2 * 30  # each example's opening and closing <eod>, none lost or cut


def test_pack_keeps_weights_aligned():
    examples = [(np.array([1, 5, 6, 1]), np.array([1.0, 0.0, 1.0], np.float32)),
                (np.array([1, 7, 1]), np.array([1.0, 1.0], np.float32))]
    (packed,) = list(pack(examples, seq_len=8, pad=0))
    assert packed.inputs.tolist() == [1, 5, 6, 1, 1, 7, 1, 0]
    assert packed.weights.tolist() == [1, 0, 1, 0, 1, 1, 0, 0]


def test_config_is_validated():
    with pytest.raises(ValueError, match="retrieved_min"):
        SequenceConfig(seq_len=64, retrieved_min=3, retrieved_max=2)
