"""Chameleon and Anole weights: conversion from transformers' own classes and from Meta's layout, exact logits,
streaming, malformed sources, and image generation and captioning in Chameleon's vocabulary."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from chameleon_models import (N_CODES, hf_logits, hf_model, image_name, vocabulary_map, write_hf_folder,
                              write_meta_release, write_text_tokenizer, write_vqgan)
from cm3.model.chameleon import ConversionError, convert_chameleon
from cm3.model.checkpoint import load_checkpoint
from cm3.model.decoder import CM3
from cm3.model.generation import (SamplingConfig, caption_image, generate_image_tokens, image_only_prompt,
                                  image_prompt, text_to_image)
from cm3.tokenizers.chameleon import ChameleonVocabulary, image_code
from conftest import cm3

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def vqgan_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqgan")
    write_vqgan(folder / "vqgan.ckpt", folder / "vqgan.yaml")
    return folder / "vqgan.ckpt", folder / "vqgan.yaml"


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    model = hf_model(n_kv_heads=2)
    return model, write_hf_folder(model, tmp_path_factory.mktemp("hf") / "chameleon", max_shard_size="100KB")


@pytest.fixture(scope="module")
def converted(hf_source, vqgan_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "ckpt"
    convert_chameleon(hf_source[1], out, vqgan=vqgan_files[0], vqgan_config=vqgan_files[1])
    return out


def mixed_ids(vocab_size: int, seed: int = 0) -> torch.Tensor:
    """Rows of text ids with an image (begin, image tokens, end) in the middle, as Chameleon reads them."""
    names = vocabulary_map()
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(names["<reserved08706>"] + 1, vocab_size, (2, 12), generator=g)
    image = torch.tensor([names[image_name(c)] for c in torch.randint(0, N_CODES, (16,), generator=g).tolist()])
    rows = [[names["<s>"], *row[:6].tolist(), names["<racm3:break>"], *image.tolist(), names["<eoss>"],
             *row[6:].tolist()] for row in text]
    return torch.tensor(rows)


def max_difference(ours: CM3, reference, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((ours(ids) - hf_logits(reference, ids)).abs().max())


@pytest.mark.parametrize("swin_norm,n_kv_heads", [(False, 2), (True, 4), (True, 1)])
def test_hugging_face_folder_converts_to_the_same_logits(swin_norm, n_kv_heads, vqgan_files, tmp_path):
    reference = hf_model(swin_norm=swin_norm, n_kv_heads=n_kv_heads, seed=n_kv_heads)
    src = write_hf_folder(reference, tmp_path / "hf")
    convert_chameleon(src, tmp_path / "out", vqgan=vqgan_files[0], vqgan_config=vqgan_files[1])
    ours = CM3.from_pretrained(tmp_path / "out").eval()
    assert (ours.config.swin_norm, ours.config.kv_heads) == (swin_norm, n_kv_heads)
    ids = mixed_ids(reference.config.vocab_size)
    assert max_difference(ours, reference, ids) <= 1e-4
    # the option matters: the same weights in the other block order give other logits
    other = CM3.from_pretrained(tmp_path / "out").eval()
    other.blocks[0].swin_norm = not swin_norm
    assert max_difference(other, reference, ids) > 1e-2


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_release_converts_to_the_same_logits(shards, tmp_path):
    reference = hf_model(n_kv_heads=2, shards=shards, seed=10 + shards)
    root = write_meta_release(reference, tmp_path / "chameleon", shards=shards)
    result = convert_chameleon(root, tmp_path / "out")
    assert result.source_format == "meta"
    ours = CM3.from_pretrained(tmp_path / "out").eval()
    assert max_difference(ours, reference, mixed_ids(reference.config.vocab_size, seed=shards)) <= 1e-4
    if shards > 1:  # each shard's qk norm goes to its own heads
        norm = ours.blocks[0].attn.q_norm.weight
        assert not torch.equal(norm[0], norm[-1]) and torch.equal(norm[0], norm[1])


def test_conversion_streams_into_shards_never_holding_the_weights_twice(hf_source, vqgan_files, tmp_path):
    result = convert_chameleon(hf_source[1], tmp_path / "out", vqgan=vqgan_files[0], vqgan_config=vqgan_files[1],
                               shard_bytes=64 * 1024)
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) == result.shards >= 4
    assert result.peak_pending_bytes < result.total_bytes / 3  # at most about one shard and one layer at a time
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(CM3.from_pretrained(tmp_path / "out").state_dict())


def break_shape(src, vq):
    path = next(src.glob("model-*.safetensors"))
    state = load_file(path)
    key = next(k for k in state if "mlp.up_proj" in k)
    state[key] = state[key][:-1]
    save_file(state, path, metadata={"format": "pt"})
    return path.name, key


def break_unknown_key(src, vq):
    path = next(src.glob("model-*.safetensors"))
    state = load_file(path)
    state["model.layers.0.self_attn.rotary.inv_freq"] = torch.zeros(4)
    save_file(state, path, metadata={"format": "pt"})
    return path.name, "model.layers.0.self_attn.rotary.inv_freq"


def break_missing_shard(src, vq):
    path = sorted(src.glob("model-*.safetensors"))[-1]
    path.unlink()
    return path.name, "model.safetensors.index.json"


def break_codebook(src, vq):
    write_vqgan(vq[0], vq[1], n_embed=N_CODES // 2)
    return "vqgan.ckpt", "quantize.embedding.weight"


def damaged_copy(damage, hf_source, vqgan_files, tmp_path):
    src = shutil.copytree(hf_source[1], tmp_path / "src")
    vq = (tmp_path / "vqgan.ckpt", tmp_path / "vqgan.yaml")
    for source, target in zip(vqgan_files, vq):
        shutil.copy(source, target)
    return src, vq, damage(src, vq)


@pytest.mark.parametrize("damage", [break_shape, break_unknown_key, break_missing_shard, break_codebook])
def test_malformed_sources_name_file_and_key_and_write_nothing(damage, hf_source, vqgan_files, tmp_path):
    src, vq, (file, key) = damaged_copy(damage, hf_source, vqgan_files, tmp_path)
    with pytest.raises(ConversionError) as error:
        convert_chameleon(src, tmp_path / "out", vqgan=vq[0], vqgan_config=vq[1])
    assert file in str(error.value) and key in str(error.value), error.value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "vqgan.ckpt", "vqgan.yaml"]


def test_cli_refuses_a_malformed_source_with_exit_2(hf_source, vqgan_files, tmp_path):
    src, vq, (file, key) = damaged_copy(break_shape, hf_source, vqgan_files, tmp_path)
    proc = cm3("convert", "chameleon", str(src), "--out", str(tmp_path / "out"), "--vqgan", str(vq[0]),
               "--vqgan-config", str(vq[1]))
    assert proc.returncode == 2, proc.stderr
    assert file in proc.stderr and key in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_meta_release_with_a_missing_or_misshapen_shard_is_refused(tmp_path):
    root = write_meta_release(hf_model(shards=2), tmp_path / "chameleon", shards=2)
    shard = root / "models" / "7b" / "consolidated.01.pth"
    state = torch.load(shard, weights_only=True)
    state["layers.1.feed_forward.w2.weight"] = state["layers.1.feed_forward.w2.weight"][:-1]
    torch.save(state, shard)
    with pytest.raises(ConversionError, match=r"consolidated\.\*\.pth: key layers\.1\.feed_forward\.w2\.weight"):
        convert_chameleon(root, tmp_path / "out")
    shard.unlink()
    with pytest.raises(ConversionError, match=r"consolidated\.01\.pth: missing"):
        convert_chameleon(root, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chameleon"]


def test_hugging_face_folder_needs_the_vq_decoder(hf_source, tmp_path):
    with pytest.raises(ConversionError, match="--vqgan"):
        convert_chameleon(hf_source[1], tmp_path / "out")


def test_chameleon_vocabulary_reads_image_tokens_by_name(tmp_path):
    names = vocabulary_map()
    write_text_tokenizer(tmp_path / "tokenizer.json")
    from cm3.tokenizers.text import TextTokenizer

    vocab = ChameleonVocabulary.from_text_tokenizer(TextTokenizer.from_file(tmp_path / "tokenizer.json"))
    assert image_code("IMGIMGBAZ") == 10 and image_code("IMGIMGAZ") == 0
    table = vocab.image_id_table()
    assert [names[image_name(c)] for c in range(N_CODES)] == table.tolist()
    assert not np.array_equal(table, np.arange(table[0], table[0] + N_CODES))  # not an offset: a table
    assert vocab.codes_from_ids(table[[5, 9]]).tolist() == [5, 9]
    text = [names["a"], names["b"]]
    assert vocab.document(text, [3, 4]) == [*text, names["<racm3:break>"], *table[[3, 4]], names["<eoss>"]]
    assert vocab.is_text(names["a"]) and not vocab.is_text(names["<s>"]) and not vocab.is_text(int(table[0]))
    with pytest.raises(ValueError, match="text"):
        vocab.text_ids([int(table[0])])


def test_generation_writes_exactly_one_image_between_chameleons_markers(converted):
    model, tokenizer = load_checkpoint(converted)
    vocab = tokenizer.vocab
    assert isinstance(vocab, ChameleonVocabulary) and tokenizer.tokens_per_image == 16
    caption = tokenizer.encode_caption("a red circle")
    retrieved = [(tokenizer.encode_caption("a blue square"), vocab.image_ids(np.arange(16)).tolist())]
    prompt = image_prompt(vocab, caption, retrieved)
    assert prompt[0] == vocab.bos and prompt[-1] == vocab.begin_image
    assert image_only_prompt(vocab, prompt) == [vocab.bos, vocab.begin_image, *retrieved[0][1], vocab.end_image,
                                                vocab.begin_image]
    for sampling in (SamplingConfig(seed=0), SamplingConfig(seed=0, image_guidance_scale=1.2),
                     SamplingConfig(seed=0, method="cd_k")):
        ids = generate_image_tokens(model, vocab, [prompt, prompt[:1] + caption + prompt[-1:]], 16, sampling)
        assert ids.shape == (2, 16) and vocab.is_image(ids.numpy()).all()
    three = generate_image_tokens(model, vocab, [prompt], 16, SamplingConfig(seed=0, image_guidance_scale=1.2))
    two = generate_image_tokens(model, vocab, [prompt], 16, SamplingConfig(seed=0))
    assert not torch.equal(three, two)  # the image-only stream takes part
    images, ids = text_to_image(model, tokenizer, "a red circle", 2, SamplingConfig(seed=1), retrieved=[
        ("a blue square", torch.arange(16))])
    assert images.shape == (2, 3, 32, 32) and ids.shape == (2, 16)  # decoded by Chameleon's VQ-GAN
    answers = caption_image(model, tokenizer, images, max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_cli_generates_with_a_converted_checkpoint(converted, tmp_path):
    proc = cm3("generate", "a red circle", "--checkpoint", str(converted), "-n", "2",
               "--out", str(tmp_path / "grid.png"), "--image-guidance", "1.2")
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    assert Image.open(tmp_path / "grid_0.png").size == (32, 32)


def test_image_head_training_changes_only_the_image_rows(converted):
    from cm3.model.train_data import Batch
    from cm3.model.train_step import TokenKinds, build_optimizer, train_image_head_only, train_step

    model, tokenizer = load_checkpoint(converted)
    model.train()
    vocab = tokenizer.vocab
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_image_head_only(model, vocab)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"]
    optimizer = build_optimizer(model, model.config)
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
    ids = mixed_ids(model.config.vocab_size)
    batch = Batch(ids[:, :-1], ids[:, 1:], torch.ones(ids.shape[0], ids.shape[1] - 1))
    losses = [train_step(model, optimizer, [batch], 1e-2, 1.0, TokenKinds(vocab)).image_loss for _ in range(3)]
    assert losses[-1] < losses[0]
    after = model.state_dict()
    image = torch.from_numpy(vocab.image_id_table())
    text = torch.ones(model.config.vocab_size, dtype=torch.bool)
    text[image] = False
    assert torch.equal(after["lm_head.weight"][text], before["lm_head.weight"][text])
    assert not torch.equal(after["lm_head.weight"][image], before["lm_head.weight"][image])
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != "lm_head.weight")


def test_chameleon_benchmark_runs_at_a_tiny_shape():
    """benchmarks/chameleon.py (the GPU figure's script) end to end on the CPU, with its transformers peer."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "chameleon.py"
    spec = importlib.util.spec_from_file_location("chameleon_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--shape", "tiny", "--images", "2", "--tokens", "8", "--prompt-len", "4",
                          "--repeats", "1", "--device", "cpu"])
    assert (result["rows"], result["tokens"]) == (6, 8)
    assert result["cm3_images_per_s"] > 0 and result["ratio"] > 0
