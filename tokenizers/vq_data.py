"""The VQ-GAN trainer's data: raw-shard images held in memory as uint8, a deterministic held-out split, and random
training batches (flips and square crops, preferring busy ones)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from cm3.core.images import decode, square_pixels, to_float


def load_images(data: str | os.PathLike[str], resolution: int) -> tuple[list[str], torch.Tensor]:
    """Keys and uint8 images [N, 3, R, R] of every usable row in the folder's Parquet shards."""
    paths = sorted(Path(data).glob("*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no .parquet shards in {data}")
    keys: list[str] = []
    arrays: list[np.ndarray] = []
    for path in paths:
        table = pq.read_table(path, columns=["key", "jpg", "status"]).to_pydict()
        for key, jpg, status in zip(table["key"], table["jpg"], table["status"]):
            if status != "success" or jpg is None:
                continue
            keys.append(str(key))
            arrays.append(square_pixels(decode(jpg), resolution))
    if not arrays:
        raise ValueError(f"no usable images (status == 'success' with jpg bytes) in {data}")
    return keys, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic split by key hash, stable across runs, machines and shard orders."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return digest / 2**64 < fraction


def random_batch(images: torch.Tensor, batch_size: int, crop: int | None, generator: torch.Generator,
           candidates: int = 1, plain_share: float = 0.0) -> torch.Tensor:
    """A random batch in [-1, 1]: random horizontal flips and, if asked, square crops (per image, the
    busiest of ``candidates`` random positions; for the first ``plain_share`` of the batch, one random position)."""
    idx = torch.randint(images.shape[0], (batch_size,), generator=generator)
    x = images[idx]
    if crop is not None and crop < x.shape[-1]:
        plain = round(batch_size * plain_share)
        parts = [_busiest_crops(x[:plain], crop, 1, generator)] if plain else []
        if plain < batch_size:
            parts.append(_busiest_crops(x[plain:], crop, max(1, candidates), generator))
        x = torch.cat(parts)
    flip = torch.rand(batch_size, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return to_float(x).contiguous(memory_format=torch.channels_last)


def _busiest_crops(x: torch.Tensor, crop: int, candidates: int, generator: torch.Generator) -> torch.Tensor:
    """Per image, of ``candidates`` random crop positions the one with the largest pixel variance."""
    corners = torch.randint(x.shape[-1] - crop + 1, (x.shape[0], candidates, 2), generator=generator)
    chosen = []
    for image, options in zip(x, corners):
        windows = [image[:, top : top + crop, left : left + crop] for top, left in options.tolist()]
        if len(windows) == 1:
            chosen.append(windows[0])
            continue
        spread = torch.stack([w.float().flatten(1).var(1).sum() for w in windows])
        chosen.append(windows[int(spread.argmax())])
    return torch.stack(chosen)
