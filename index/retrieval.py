"""Choosing retrieved documents with the paper's filters (CM3Leon / RA-CM3).

For a query document the index proposes candidates by inner product; ``select_neighbours``
then keeps at most ``k`` of them:

- never the document itself;
- relevance: skip a candidate whose score to the query is above ``max_similarity`` (0.9):
  a near-duplicate teaches the model to copy;
- diversity: skip a candidate whose similarity to a neighbour already chosen is above
  ``max_similarity`` too;
- modality: multimodal candidates (text and image) are taken before single-modality ones.

Query dropout (drop 20% of the query's text tokens before embedding it) happens before the
search, in ``drop_query_tokens``, because it changes the query vector, not the candidate list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_K = 2
DEFAULT_MAX_SIMILARITY = 0.9
DEFAULT_QUERY_DROPOUT = 0.2


@dataclass(frozen=True)
class RetrievalSettings:
    k: int = DEFAULT_K
    max_similarity: float = DEFAULT_MAX_SIMILARITY
    candidates: int = 32  # how many the index proposes per query before filtering
    prefer_multimodal: bool = True
    query_dropout: float = 0.0  # 0.2 for training-time retrieval, as in the paper

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if self.candidates < self.k + 1:
            raise ValueError(f"candidates ({self.candidates}) must exceed k ({self.k}): the query itself is one")
        if not 0.0 <= self.query_dropout < 1.0:
            raise ValueError(f"query_dropout must be in [0, 1), got {self.query_dropout}")


def select_neighbours(
    query_id: int,
    candidate_ids: np.ndarray,
    candidate_scores: np.ndarray,
    vectors: np.ndarray,
    multimodal: np.ndarray,
    settings: RetrievalSettings,
) -> tuple[list[int], list[float]]:
    """Filter one query's candidates (best first) down to at most ``settings.k`` neighbours.

    ``vectors`` (row = document id, unit norm) and ``multimodal`` (bool per document id) may be
    memory-mapped: only the candidates' rows are read.
    """
    order = np.argsort(-candidate_scores, kind="stable")
    passes = []
    for i in order:
        doc, score = int(candidate_ids[i]), float(candidate_scores[i])
        if doc < 0 or doc == query_id or score > settings.max_similarity:
            continue
        passes.append((doc, score))
    if settings.prefer_multimodal:
        passes.sort(key=lambda pair: not bool(multimodal[pair[0]]))  # stable: keeps score order within a group
    chosen: list[int] = []
    scores: list[float] = []
    chosen_vectors: list[np.ndarray] = []
    for doc, score in passes:
        if len(chosen) == settings.k:
            break
        vector = np.asarray(vectors[doc], dtype=np.float32)
        if any(float(vector @ other) > settings.max_similarity for other in chosen_vectors):
            continue
        chosen.append(doc)
        scores.append(score)
        chosen_vectors.append(vector)
    return chosen, scores


def drop_query_tokens(text: str, fraction: float, rng: np.random.Generator) -> str:
    """Drop a fraction of the words of a query caption (at least one kept) before it is embedded."""
    words = text.split()
    if fraction <= 0 or len(words) < 2:
        return text
    n_drop = min(len(words) - 1, int(round(fraction * len(words))))
    dropped = set(rng.choice(len(words), size=n_drop, replace=False).tolist())
    return " ".join(w for i, w in enumerate(words) if i not in dropped)
