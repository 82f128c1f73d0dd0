"""Small real artefacts the tests build: raw shards in cm3 ingest's layout, tokenizers, a CLIP checkpoint,
retrieval-augmented and SFT training shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


# A 64-token VQ-GAN with 16 codes: the training tests' tokenizer (vocabulary of 300 BPE ids and 16 codes).
TRAIN_VQ = dict(ch=8, ch_mult=(1, 2, 2), z_channels=16, embed_dim=16, n_embed=16, resolution=32, norm_groups=8,
                num_res_blocks=1, attn_resolutions=())
TRAIN_CAPTIONS = [f"a {c} {s} at the {p}" for c in ("red", "blue", "green") for s in ("circle", "square")
                  for p in ("top", "bottom", "left")] * 20


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


def write_augmented_shards(folder: Path, vocab, shards: int = 2, rows: int = 48, seed: int = 0) -> Path:
    """Retrieval-augmented shards with learnable structure: each caption is a repeated BPE pattern whose image
    codes follow from it, and each row's neighbours are rows like it."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        records = []
        for i in range(rows):
            topic = int(rng.integers(4))
            text = [(topic * 7 + k) % 40 for k in range(int(rng.integers(6, 12)))]
            image = [(topic * 3 + k) % vocab.image_vocab_size for k in range(64)]
            records.append({"key": f"{shard}-{i}", "caption": "", "text_ids": text, "image_ids": image,
                            "neighbour_text_ids": [text[:6], text[1:7]], "neighbour_image_ids": [image, image]})
        pq.write_table(pa.Table.from_pylist(records), folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text("{}")
    return folder


def write_sft_shards(folder: Path, vocab, rows: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(rows):
        topic = i % 4
        instruction = vocab.text_ids([(topic * 5 + k) % 40 for k in range(8)])
        answer = vocab.text_ids([(topic * 11 + k) % 40 for k in range(10)])
        records.append({"ids": [vocab.eod, *instruction, vocab.break_, *answer, vocab.eod]})
    pq.write_table(pa.Table.from_pylist(records), folder / "00000.parquet")
    return folder


def save_random_inception(path: Path) -> Path:
    """A randomly initialised network of the FID Inception's shape (torchvision's Inception v3 layout with the 1008
    classes of the TensorFlow graph), saved as a state dict as torch-fidelity's weights file is; He-initialised so
    its activations neither vanish nor explode through the 94 layers."""
    import torchvision

    torch.manual_seed(0)
    network = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(network.state_dict(), path)
    return path


def write_token_shards(folder: Path, tokenizer_dir: Path, shards: int = 2, rows: int = 6,
                       clip: dict | None = None) -> Path:
    """Token shards in cm3 tokenize's layout (config, shards, stats), recording ``tokenizer_dir``'s fingerprint;
    ids follow the caption index so they are valid for the training tests' tokenizer."""
    from cm3.pipeline.tokenize import CONFIG_FILE, token_schema, tokenizer_fingerprint

    tokenizer = MultimodalTokenizer.load(tokenizer_dir)
    tokens = tokenizer.tokens_per_image
    folder.mkdir(parents=True)
    for shard in range(shards):
        caps = TRAIN_CAPTIONS[shard * rows:(shard + 1) * rows]
        table = pa.Table.from_pylist([
            {"key": f"{shard:05d}{row:03d}", "url": f"http://127.0.0.1:9/{row}.jpg", "caption": caption,
             "source_shard": shard, "text_ids": tokenizer.text.encode(caption),
             "image_ids": [(row + k) % tokenizer.vocab.image_vocab_size for k in range(tokens)]}
            for row, caption in enumerate(caps)], schema=token_schema(tokens))
        pq.write_table(table, parquet_path(folder, shard))
        write_json(stats_path(folder, shard), {"count": rows, "kept": rows, "tokens_per_image": tokens})
    write_json(folder / CONFIG_FILE, {"tokenizer_sha256": tokenizer_fingerprint(tokenizer_dir),
                                      "tokenizer_content_sha256": tokenizer_fingerprint(tokenizer_dir, True),
                                      "tokens_per_image": tokens, "clip": clip, "clip_dim": 32 if clip else None,
                                      "raw_dir": str(folder.parent / "raw")})
    return folder


def save_tiny_checkpoint(folder: Path, tokenizer_dir: Path) -> Path:
    """A 1-layer decoder with the tokenizer as a cm3 inference checkpoint (what cm3 generate and --init read)."""
    from cm3.model.checkpoint import save_checkpoint
    from cm3.model.config import CM3Config
    from cm3.model.decoder import CM3

    tokenizer = MultimodalTokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    config = CM3Config.from_preset("tiny", vocab_size=tokenizer.vocab.size, n_layers=1, d_model=32, n_heads=2,
                                   max_seq_len=256)
    save_checkpoint(folder, CM3(config), tokenizer, {"stage": "test"})
    return folder


def damage_a_page_header(path: Path, column: str) -> None:
    """Overwrite the header of ``column``'s first data page: the footer still reads, the page does not."""
    metadata = pq.ParquetFile(path).metadata
    names = [metadata.row_group(0).column(c).path_in_schema for c in range(metadata.num_columns)]
    index = next(i for i, name in enumerate(names) if name == column or name.startswith(f"{column}."))
    start = metadata.row_group(0).column(index).data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 16] = bytes(b ^ 0xFF for b in data[start:start + 16])
    path.write_bytes(bytes(data))
