"""CLIP score and FD-CLIP with an OpenCLIP model (``cm3.tokenizers.clip_embedder.ClipEmbedder``: a hub model or one
that ``cm3 clip train`` wrote).

- CLIP score: 100 * max(cos(image, text), 0) per pair, averaged (CLIPScore without its 2.5 weight, as torchmetrics
  reports it); a generated image against the prompt it was made for.
- FD-CLIP: the Fréchet distance between two image sets' unit CLIP image vectors (the space CLIP score and retrieval
  use), a second opinion on FID from a network that has read captions.

``clip_score`` and ``fd_clip`` are the entry points for other callers (the demo's report); ``cm3 eval`` streams
the same pieces over shards of images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cm3.evaluation.frechet import frechet_distance, statistics
from cm3.tokenizers.clip_embedder import ClipEmbedder, ImageBatch


def pair_scores(image_vectors: np.ndarray, text_vectors: np.ndarray) -> np.ndarray:
    """CLIP score of each (image, text) pair of unit vectors [N, D]: 100 * max(cosine, 0)."""
    if image_vectors.shape != text_vectors.shape:
        raise ValueError(f"{len(image_vectors)} images but {len(text_vectors)} texts")
    return 100.0 * np.maximum((image_vectors * text_vectors).sum(axis=1), 0.0)


def clip_score(images: ImageBatch, texts: Sequence[str], clip: ClipEmbedder) -> float:
    """Mean CLIP score of images (PIL or uint8 [N, H, W, 3]) against their texts, pair by pair."""
    if len(images) != len(texts) or not len(texts):
        raise ValueError(f"clip_score needs one text per image and at least one pair, got {len(images)} images "
                         f"and {len(texts)} texts")
    return float(pair_scores(clip.embed_images(images), clip.embed_texts(texts)).mean())


def fd_clip(a: ImageBatch, b: ImageBatch, clip: ClipEmbedder) -> float:
    """Fréchet distance between two image sets (at least 2 images each) in CLIP's image space."""
    return frechet_distance(statistics(clip.embed_images(a)), statistics(clip.embed_images(b)))
