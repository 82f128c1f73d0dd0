"""Retrieval at generation time: the documents to prepend to a prompt (retrieval-augmented prompting)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cm3.index.build import load_for_search
from cm3.index.retrieval import RetrievalSettings, select_neighbours


class Retriever:
    """Opens an index folder (``cm3 build-index --index``) with the CLIP model that built it."""

    def __init__(self, index_dir: Path, settings: RetrievalSettings = RetrievalSettings()):
        from cm3.tokenizers.clip_embedder import ClipEmbedder

        self.index, self.store, identity = load_for_search(Path(index_dir))
        self.embedder = ClipEmbedder(identity["model_name"], identity["pretrained"])
        self.captions = self.store.documents(["caption"]).column("caption").to_pylist()
        self.settings = settings

    def for_text(self, prompt: str, k: int | None = None) -> list[tuple[str, np.ndarray]]:
        """(caption, VQ codes) of up to k documents for a text prompt, best first, with the paper's filters."""
        settings = self.settings if k is None else RetrievalSettings(
            k=k, max_similarity=self.settings.max_similarity, candidates=max(self.settings.candidates, 8 * k + 1))
        query = self.embedder.embed_texts([prompt])
        scores, ids = self.index.search(query, settings.candidates)
        chosen, _ = select_neighbours(-1, ids[0], scores[0], self.store.vectors, self.store.multimodal, settings)
        return [(self.captions[row], np.asarray(self.store.image_ids[row])) for row in chosen]
