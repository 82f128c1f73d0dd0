"""Small real artefacts the tests build: raw shards in cm3 ingest's layout, tokenizers, a CLIP checkpoint."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cm3.core.files import write_json
from cm3.core.shards import parquet_path, stats_path
from cm3.synthetic.shapes import encode_jpeg, render, spec_for
from cm3.tokenizers.multimodal import MultimodalTokenizer
from cm3.tokenizers.text import TextTokenizer
from cm3.tokenizers.vqgan import VQGAN, VQGANConfig

TINY_F32 = dict(ch=32, ch_mult=(1, 2, 2, 2, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=16,
                embed_dim=16, n_embed=64)
TINY_F8 = dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=16,
               embed_dim=16, n_embed=8192)


def write_raw_shards(folder: Path, shards: int, rows: int, broken: dict[tuple[int, int], bytes] | None = None) -> None:
    """Raw shards in cm3 ingest's layout; ``broken`` puts other bytes at (shard, row)."""
    folder.mkdir(parents=True)
    broken = broken or {}
    for shard in range(shards):
        keys, jpgs, captions = [], [], []
        for row in range(rows):
            spec = spec_for(shard * rows + row)
            keys.append(f"{shard:05d}{row:03d}")
            jpgs.append(broken.get((shard, row), encode_jpeg(render(spec))))
            captions.append(spec.caption)
        table = pa.table({"key": keys, "url": [f"http://127.0.0.1:9/{k}.jpg" for k in keys], "caption": captions,
                          "jpg": pa.array(jpgs, pa.binary()), "status": ["success"] * rows})
        pq.write_table(table, parquet_path(folder, shard))
        write_json(stats_path(folder, shard), {"count": rows, "successes": rows})


def make_tokenizer(folder: Path, vq_config: dict, captions: list[str]) -> MultimodalTokenizer:
    torch.manual_seed(0)
    tokenizer = MultimodalTokenizer(TextTokenizer.train(captions, vocab_size=300), VQGAN(VQGANConfig(**vq_config)))
    tokenizer.save(folder)
    return tokenizer


def captions(n: int = 50) -> list[str]:
    return [spec_for(i).caption for i in range(n)]


def save_random_clip(path: Path, model_name: str = "cm3-clip-tiny") -> dict:
    """A randomly initialised OpenCLIP model saved as a checkpoint file: a fixed model that every process
    (driver, Ray actors) loads identically, as a pretrained one would be."""
    import open_clip
    from safetensors.torch import save_file

    from cm3.tokenizers.clip_embedder import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return {"model_name": model_name, "pretrained": str(path)}
