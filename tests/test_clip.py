"""The demo CLIP: config registration, a short training run, OpenCLIP-loadable checkpoints, the embedder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from cm3.core.files import write_json
from cm3.core.shards import parquet_path, stats_path
from cm3.synthetic.shapes import encode_jpeg, render, spec_for
from cm3.tokenizers.clip_embedder import ClipEmbedder, normalise, register_model_configs
from cm3.tokenizers.clip_training import CHECKPOINT_FILE, train_clip
from cm3.tokenizers.training_options import ClipTrainOptions

MODEL = "cm3-clip-tiny"


def write_raw_shards(folder: Path, n: int, shards: int = 2) -> None:
    """Raw shards as `cm3 ingest` writes them, with one failed row per shard (null jpg)."""
    folder.mkdir(parents=True)
    per_shard = n // shards
    for shard_id in range(shards):
        specs = [spec_for(i) for i in range(shard_id * per_shard, (shard_id + 1) * per_shard)]
        keys = [f"{shard_id:05d}{i:04d}" for i in range(per_shard + 1)]
        table = pa.table({
            "key": keys,
            "caption": [s.caption for s in specs] + ["a lost image"],
            "jpg": pa.array([encode_jpeg(render(s)) for s in specs] + [None], pa.binary()),
            "status": ["success"] * per_shard + ["failed_to_download"],
        })
        pq.write_table(table, parquet_path(folder, shard_id))
        write_json(stats_path(folder, shard_id), {"count": per_shard + 1, "successes": per_shard})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("clip")
    write_raw_shards(tmp / "raw", 200)
    options = ClipTrainOptions(steps=40, batch_size=32, lr=5e-4, torch_threads=1)
    report = train_clip(tmp / "raw", tmp / "clip", options, progress=False)
    return tmp / "clip", report


def test_tiny_config_is_registered_and_builds():
    register_model_configs()
    assert MODEL in open_clip.list_models()
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    model.eval()
    with torch.no_grad():
        text = model.encode_text(open_clip.get_tokenizer(MODEL)(["a red circle"]))
        image = model.encode_image(preprocess(render(spec_for(0))).unsqueeze(0))  # any tower (ViT or ResNet)
    assert text.shape == image.shape == (1, 128)


def test_training_lowers_the_contrastive_loss_and_reports_recall(trained):
    folder, report = trained
    assert report["pairs"] == 200  # the failed rows are skipped
    assert report["heldout"]["loss"] < 0.8 * report["heldout_before"]["loss"]
    assert report["train_loss_last"] < report["train_loss_first"]
    for key in ("text_to_image_r@1", "text_to_image_r@5", "image_to_text_r@1", "image_to_text_r@5"):
        assert 0.0 <= report["heldout"][key] <= 1.0
    assert sorted(p.name for p in folder.iterdir()) == ["clip_config.json", CHECKPOINT_FILE]  # no temp files left
    config = json.loads((folder / "clip_config.json").read_text())
    assert config["model_name"] == MODEL and config["checkpoint"] == CHECKPOINT_FILE
    assert config["report"] == report


def test_checkpoint_loads_through_open_clip_with_identical_outputs(trained):
    folder, _ = trained
    checkpoint = folder / CHECKPOINT_FILE
    loaded, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=str(checkpoint))
    direct, _, _ = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    direct.load_state_dict(load_file(checkpoint))
    fresh, _, _ = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    pixels = preprocess(render(spec_for(9999))).unsqueeze(0)
    tokens = open_clip.get_tokenizer(MODEL)([spec_for(9999).caption])
    with torch.no_grad():
        outputs = [(m.eval().encode_image(pixels), m.encode_text(tokens)) for m in (loaded, direct, fresh)]
    for a, b in zip(outputs[0], outputs[1]):
        assert torch.equal(a, b)
    assert not torch.allclose(outputs[0][0], outputs[2][0])  # the weights really came from the file


def test_embedder_vectors_documents_and_identity(trained):
    folder, _ = trained
    embedder = ClipEmbedder.from_trained(folder)
    specs = [spec_for(i) for i in range(5000, 5006)]
    images = [render(s) for s in specs]
    texts = [s.caption for s in specs]
    image_vectors, text_vectors = embedder.embed_images(images), embedder.embed_texts(texts)
    assert embedder.dim == 128 and image_vectors.shape == text_vectors.shape == (6, 128)
    assert image_vectors.dtype == text_vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image_vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embedder.embed_images(np.stack([np.asarray(im) for im in images])), image_vectors,
                               atol=1e-6)
    documents = embedder.embed_documents(images, texts)
    np.testing.assert_allclose(documents, normalise(image_vectors + text_vectors), atol=1e-5)
    partial = embedder.embed_documents([images[0], None], [None, texts[1]])
    np.testing.assert_allclose(partial, np.stack([image_vectors[0], text_vectors[1]]), atol=1e-5)
    with pytest.raises(ValueError, match="neither an image nor a text"):
        embedder.embed_documents([None], [None])
    assert embedder.identity == {"model_name": MODEL, "pretrained": str(folder / CHECKPOINT_FILE)}


def test_matching_image_text_pairs_score_higher_than_mismatched_ones(trained):
    folder, _ = trained
    embedder = ClipEmbedder.from_trained(folder)
    specs = [spec_for(i) for i in range(6000, 6060)]
    similarity = embedder.embed_texts([s.caption for s in specs]) @ embedder.embed_images([render(s) for s in specs]).T
    matched = np.diag(similarity).mean()
    mismatched = similarity[~np.eye(len(specs), dtype=bool)].mean()
    assert matched > mismatched + 0.1


def test_unknown_model_and_missing_checkpoint_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=f"unknown CLIP model 'no-such-clip'.*{MODEL}"):
        ClipEmbedder("no-such-clip", None)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        ClipEmbedder(MODEL, str(missing))
    (tmp_path / "raw").mkdir()
    with pytest.raises(ValueError, match="0 usable image-caption pairs"):
        train_clip(tmp_path / "raw", tmp_path / "clip", progress=False)
