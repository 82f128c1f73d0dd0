"""Retrieval at query time: one prompt (or image) at a time, for `cm3 generate --index`, `cm3 search` and serving."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cm3.index.build import load_for_search
from cm3.index.retrieval import RetrievalSettings, select_neighbours

if TYPE_CHECKING:
    from PIL import Image


class Retriever:
    """Opens an index folder (``cm3 build-index --index``) with the CLIP model that built it.

    Searches the folder's online index (``cm3 build-index --online``: tuned for single-query latency) when it
    has one, else the batch index; ``self.index.info["workload"]`` says which.
    """

    def __init__(self, index_dir: Path, settings: RetrievalSettings = RetrievalSettings()):
        from cm3.tokenizers.clip_embedder import ClipEmbedder

        self.index, self.store, identity = load_for_search(Path(index_dir))
        self.embedder = ClipEmbedder(identity["model_name"], identity["pretrained"])
        self.captions = self.store.documents(["caption"]).column("caption").to_pylist()
        self.settings = settings

    def nearest(self, text: str | None = None, image: Image.Image | None = None, k: int = 5) -> list[tuple[int, float]]:
        """(document row, score) of the k documents nearest to a text, an image or both, best first, unfiltered."""
        scores, ids = self.index.search(self.embedder.embed_documents([image], [text]), k)
        return [(int(row), float(score)) for row, score in zip(ids[0], scores[0]) if row >= 0]

    def for_text(self, prompt: str, k: int | None = None) -> list[tuple[str, np.ndarray]]:
        """(caption, VQ codes) of up to k documents for a text prompt, best first, with the paper's filters."""
        settings = self.settings if k is None else RetrievalSettings(
            k=k, max_similarity=self.settings.max_similarity, candidates=max(self.settings.candidates, 8 * k + 1))
        query = self.embedder.embed_texts([prompt])
        scores, ids = self.index.search(query, settings.candidates)
        chosen, _ = select_neighbours(-1, ids[0], scores[0], self.store.vectors, self.store.multimodal, settings)
        return [(self.captions[row], np.asarray(self.store.image_ids[row])) for row in chosen]
