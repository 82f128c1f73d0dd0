"""The paper's retrieval filters on small exact cases."""

from __future__ import annotations

import numpy as np
import pytest

from cm3.index.retrieval import RetrievalSettings, drop_query_tokens, select_neighbours


def unit(*rows):
    v = np.asarray(rows, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def angle_vectors(degrees):
    """Unit vectors in 2D at the given angles: cosine between i and j is cos(angle_i - angle_j)."""
    rad = np.radians(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def candidates_for(query, vectors):
    scores = vectors @ vectors[query]
    return np.arange(len(vectors)), scores


def test_self_is_never_retrieved_and_k_is_respected():
    vectors = angle_vectors([0, 40, 70, 100, 130])  # neighbours 30 degrees apart: cos 0.87, not duplicates
    ids, scores = candidates_for(0, vectors)
    chosen, chosen_scores = select_neighbours(0, ids, scores, vectors, np.ones(5, bool), RetrievalSettings(k=2))
    assert chosen == [1, 2]
    assert chosen_scores == pytest.approx([np.cos(np.radians(40)), np.cos(np.radians(70))], abs=1e-6)
    for k in (0, 1, 3, 4):
        assert len(select_neighbours(0, ids, scores, vectors, np.ones(5, bool), RetrievalSettings(k=k))[0]) == k


def test_near_duplicates_of_the_query_are_skipped():
    vectors = angle_vectors([0, 10, 20, 50, 80])  # cos(10)=0.985, cos(20)=0.940 > 0.9; cos(50)=0.64
    ids, scores = candidates_for(0, vectors)
    chosen, _ = select_neighbours(0, ids, scores, vectors, np.ones(5, bool), RetrievalSettings(k=2))
    assert chosen == [3, 4]
    loose = RetrievalSettings(k=2, max_similarity=0.99)
    assert select_neighbours(0, ids, scores, vectors, np.ones(5, bool), loose)[0] == [1, 2]


def test_near_duplicates_of_a_chosen_neighbour_are_skipped():
    # 1 and 2 are 10 degrees apart (cos 0.985): once 1 is chosen, 2 is a duplicate of it; 3 is not.
    vectors = angle_vectors([0, 40, 50, 90])
    ids, scores = candidates_for(0, vectors)
    chosen, _ = select_neighbours(0, ids, scores, vectors, np.ones(4, bool), RetrievalSettings(k=2))
    assert chosen == [1, 3]


def test_multimodal_documents_are_preferred_then_single_modality_fills_in():
    vectors = angle_vectors([0, 30, 60, 90])
    multimodal = np.array([True, False, True, True])
    ids, scores = candidates_for(0, vectors)
    chosen, _ = select_neighbours(0, ids, scores, vectors, multimodal, RetrievalSettings(k=2))
    assert chosen == [2, 3]
    chosen, _ = select_neighbours(0, ids, scores, vectors, multimodal, RetrievalSettings(k=3))
    assert chosen == [2, 3, 1]
    plain = RetrievalSettings(k=2, prefer_multimodal=False)
    assert select_neighbours(0, ids, scores, vectors, multimodal, plain)[0] == [1, 2]


def test_padding_ids_from_the_index_are_ignored():
    vectors = angle_vectors([0, 45])
    chosen, _ = select_neighbours(0, np.array([-1, 1, -1]), np.array([0.0, 0.7, 0.0]), vectors, np.ones(2, bool),
                                  RetrievalSettings(k=2))
    assert chosen == [1]


def test_query_dropout_drops_a_fifth_of_the_words_deterministically():
    text = "a small red circle at the top left on a white background"  # 12 words
    rng = np.random.default_rng(0)
    dropped = drop_query_tokens(text, 0.2, rng)
    assert len(dropped.split()) == 12 - round(0.2 * 12)
    assert all(word in text.split() for word in dropped.split())
    assert drop_query_tokens(text, 0.2, np.random.default_rng(0)) == dropped
    assert drop_query_tokens(text, 0.0, rng) == text
    assert drop_query_tokens("circle", 0.5, rng) == "circle"


def test_settings_are_validated():
    with pytest.raises(ValueError, match="candidates"):
        RetrievalSettings(k=4, candidates=4)
    with pytest.raises(ValueError, match="query_dropout"):
        RetrievalSettings(query_dropout=1.0)
