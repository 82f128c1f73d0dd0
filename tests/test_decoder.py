"""The decoder: shapes, presets and their sizes, the paper's init, KV-cache decoding, checkpoints, and training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cm3.model.config import PRESETS, CM3Config, num_parameters
from cm3.model.decoder import CM3, KVCache, image_cells
from cm3.model.objective import cm3_loss

pytestmark = pytest.mark.usefixtures("torch_one_thread")
FIXTURES = Path(__file__).parent / "fixtures"


def small_config(**overrides) -> CM3Config:
    return CM3Config.from_dict({"vocab_size": 97, "n_layers": 2, "d_model": 64, "n_heads": 4, "max_seq_len": 64,
                                **overrides})


def randomized(config: CM3Config, seed: int = 0) -> CM3:
    """A model whose out-projections are not zero: at init every block is the identity, which hides bugs."""
    torch.manual_seed(seed)
    model = CM3(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0.0, 0.08)
    return model


def test_logits_shape_and_dtype():
    model = CM3(small_config())
    ids = torch.randint(0, 97, (3, 11))
    logits = model(ids)
    assert logits.shape == (3, 11, 97) and logits.dtype == torch.float32
    assert model.to(torch.bfloat16)(ids).dtype == torch.float32  # bf16 weights, float32 logits


def test_positions_past_max_seq_len_raise():
    model = CM3(small_config(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="kv_cache"):
        model(torch.zeros(1, 2, dtype=torch.long), start_pos=3)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts_match_the_built_model(name):
    config = CM3Config.from_preset(name)
    with torch.device("meta"):  # shapes only: even 7b costs no memory
        model = CM3(config)
    built = sum(p.numel() for p in model.parameters())
    print(f"{name}: {built / 1e6:,.1f}M parameters ({num_parameters(config, False) / 1e6:,.1f}M without embeddings), "
          f"vocab {config.vocab_size}")
    assert built == num_parameters(config)


CHAMELEON = dict(activation="swiglu", positions="rope", tie_embeddings=False, norm="rmsnorm", qk_norm=True,
                 qk_norm_affine=True, n_kv_heads=2, mlp_hidden_size=96)


@pytest.mark.parametrize("overrides", [dict(activation="swiglu"), dict(positions="rope", tie_embeddings=False),
                                       dict(image_grid=3, image_offset=60), CHAMELEON,
                                       dict(CHAMELEON, swin_norm=True, n_kv_heads=1)])
def test_option_parameter_counts_match_the_built_model(overrides):
    config = small_config(**overrides)
    assert sum(p.numel() for p in CM3(config).parameters()) == num_parameters(config)


def test_preset_sizes_match_their_names():
    assert num_parameters(CM3Config.from_preset("350m")) == pytest.approx(350e6, rel=0.15)
    assert num_parameters(CM3Config.from_preset("760m")) == pytest.approx(760e6, rel=0.15)
    assert num_parameters(CM3Config.from_preset("7b")) == pytest.approx(7e9, rel=0.15)
    big = CM3Config.from_preset("7b", vocab_size=1000, n_heads=64)
    assert (big.vocab_size, big.n_heads, big.head_dim, big.lr, big.warmup_steps) == (1000, 64, 64, 1.2e-4, 1500)


def test_unknown_preset_and_bad_config_raise():
    with pytest.raises(ValueError, match="tiny, 350m, 760m, 7b"):
        CM3Config.from_preset("13b")
    with pytest.raises(ValueError, match="unknown config field"):
        CM3Config.from_preset("tiny", n_layer=3)
    with pytest.raises(ValueError, match="divisible"):
        small_config(n_heads=5)
    with pytest.raises(ValueError, match="activation"):
        small_config(activation="gelu")


def test_config_round_trips_through_json():
    config = CM3Config.from_preset("760m", vocab_size=4321, qk_norm=True)
    assert CM3Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_init_follows_the_paper():
    config = small_config(vocab_size=2048, d_model=256, max_seq_len=512, tie_embeddings=False)
    model = CM3(config)
    std = config.init_std
    for name, weight in model.named_parameters():
        assert not name.endswith("bias")
        if name.endswith(("attn.out.weight", "mlp.down.weight")):
            assert torch.count_nonzero(weight) == 0, name
        elif name == "pos_emb.weight":
            assert weight.std().item() == pytest.approx(config.pos_init_std * 0.987, rel=0.03)
            assert weight.abs().max() <= 3 * config.pos_init_std + 1e-9
        else:  # a normal cut at 3 std has std 0.987 * std
            assert weight.std().item() == pytest.approx(std * 0.987, rel=0.03), name
            assert weight.mean().abs() < 1e-4, name
            assert weight.abs().max() <= 3 * std + 1e-7, name
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * config.n_layers + 1 and all(not list(m.parameters()) for m in norms)
    with_qk = CM3(small_config(qk_norm=True))
    assert all(not list(m.parameters()) for m in with_qk.modules() if isinstance(m, torch.nn.LayerNorm))
    assert {n for n, _ in with_qk.named_parameters()} == {n for n, _ in CM3(small_config()).named_parameters()}


def test_checkpoints_saved_before_the_chameleon_options_load_and_give_the_same_logits():
    """Folders written by the decoder before the options existed (tests/fixtures/pre_chameleon, config.json without
    the new fields), with the logits that code computed from them: the same up to float rounding (another CPU's
    vector units round differently, by under 1e-6; a changed default would move them by whole units)."""
    from safetensors.torch import load_file

    folder = FIXTURES / "pre_chameleon"
    expected = load_file(folder / "logits.safetensors")
    for name in ("paper", "rope_swiglu_qknorm"):
        assert "norm" not in json.loads((folder / name / "config.json").read_text())
        model = CM3.from_pretrained(folder / name).eval()
        assert (model.config.norm, model.config.kv_heads, model.config.swin_norm) == ("layernorm", 4, False)
        with torch.no_grad():
            torch.testing.assert_close(model(expected["ids"]), expected[name], rtol=0, atol=1e-5, msg=name)


def test_chameleon_options_change_the_decoder_and_are_checked():
    base, options = randomized(small_config(**CHAMELEON)), small_config(**CHAMELEON)
    assert base.blocks[0].attn.qkv.weight.shape == (64 + 2 * 2 * 16, 64)  # 4 query heads, 2 key/value heads
    assert base.blocks[0].attn.q_norm.weight.shape == (4, 16) and base.blocks[0].mlp.up.weight.shape == (96, 64)
    swin = CM3(small_config(**CHAMELEON, swin_norm=True)).eval()
    swin.load_state_dict(base.state_dict())
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert not torch.allclose(swin(ids), base(ids), atol=1e-3)
    assert CM3(options).blocks[0].attn.q_norm.bias.abs().sum() == 0  # affines start as identity
    with pytest.raises(ValueError, match="n_kv_heads"):
        small_config(n_kv_heads=3)
    with pytest.raises(ValueError, match="norm"):
        small_config(norm="batchnorm")
    with pytest.raises(ValueError, match="qk_norm_affine needs qk_norm"):
        small_config(qk_norm_affine=True)


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("qk_norm", [False, True, "chameleon"])
def test_kv_cache_decoding_matches_a_full_forward(positions, qk_norm):
    if qk_norm == "chameleon":  # grouped-query attention: the cache holds the 2 key/value heads only
        model = randomized(small_config(**{**CHAMELEON, "positions": positions}))
        assert model.new_kv_cache(batch=2, max_len=32).keys.shape[2] == 2
    else:
        model = randomized(small_config(positions=positions, qk_norm=qk_norm,
                                        activation="swiglu" if qk_norm else "relu"))
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(batch=2, max_len=32)
        steps = [model(ids[:, :9], kv_cache=cache), model(ids[:, 9:14], kv_cache=cache, start_pos=9)]
        steps += [model(ids[:, t:t + 1], kv_cache=cache, start_pos=t) for t in range(14, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


IMAGE = 60  # image ids of the grid tests are 60..96; 1 is <eod>, 2 <break>, 10 stands for a <mask:i>


def test_image_cells_number_each_image_in_raster_order_and_skip_cut_images():
    ids = torch.tensor([[1, 30, 31, 2, 60, 61, 62, 63, 64, 1],  # caption first; the run outgrows a 2x2 grid
                        [1, 70, 71, 2, 30, 1, 0, 0, 0, 0],  # image first, then padding
                        [1, 30, 2, 60, 61, 10, 62, 63, 10, 64]])  # CM3: an image's rest after <mask:i>, its span
    cells, next_cell = image_cells(ids, IMAGE, 4)
    assert cells.tolist() == [[-1, -1, -1, -1, 0, 1, 2, 3, -1, -1],
                              [-1, 0, 1, -1, -1, -1, -1, -1, -1, -1],
                              [-1, -1, -1, 0, 1, -1, -1, -1, -1, -1]]
    assert next_cell.tolist() == [0, -1, -1]  # after <eod> an image may start; after a pad or a cut image not
    for cut in range(1, 10):  # in two calls, the carry continues the image exactly
        first, carry = image_cells(ids[:, :cut], IMAGE, 4)
        second, _ = image_cells(ids[:, cut:], IMAGE, 4, carry)
        assert torch.cat([first, second], dim=1).tolist() == cells.tolist(), cut


def test_image_grid_embeddings_reach_image_tokens_only():
    model = randomized(small_config(positions="rope", image_grid=2, image_offset=IMAGE))
    ids = torch.tensor([[1, 30, 31, 32, 2, 60, 61, 62, 63, 2, 33]])
    with torch.no_grad():
        before = model(ids)
        model.row_emb.weight.add_(torch.randn_like(model.row_emb.weight))  # (a constant would vanish in LayerNorm)
        after = model(ids)
    assert torch.equal(before[:, :5], after[:, :5])  # the caption and <break>: no image token yet
    assert (before[:, 5:] - after[:, 5:]).abs().amax(dim=-1).min() > 1e-3


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_kv_cache_decoding_with_an_image_grid_matches_a_full_forward(positions):
    model = randomized(small_config(positions=positions, image_grid=3, image_offset=IMAGE))
    caption = torch.randint(11, IMAGE, (2, 5))
    image = torch.randint(IMAGE, 97, (2, 9))
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), caption, torch.full((2, 1), 2), image], dim=1)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(batch=1, max_len=32)
        model(ids[:1, :9], kv_cache=cache)  # the prompt once, then one row per stream as guidance does
        rows = cache.repeat(2)
        rows.reorder(torch.tensor([0, 0]))
        steps = [model(ids[:1, t:t + 1].expand(2, 1), kv_cache=rows, start_pos=t) for t in range(9, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1)[0], full[0, 9:], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(steps, dim=1)[1], full[0, 9:], atol=1e-4, rtol=0)


def test_kv_cache_copy_repeat_reorder_and_reset():
    model = randomized(small_config(positions="rope"))
    prompt, next_ids = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (2, 1))
    with torch.no_grad():
        cache = model.new_kv_cache(batch=1, max_len=16)
        model(prompt, kv_cache=cache)
        snapshot = cache.copy()
        rows = cache.repeat(2)  # one prompt, two rows (e.g. cond and uncond streams)
        assert isinstance(rows, KVCache) and rows.batch == 2 and rows.max_len == 16
        decoded = model(next_ids, kv_cache=rows, start_pos=6)
        full = model(torch.cat([prompt.expand(2, -1), next_ids], dim=1))[:, -1:]
        torch.testing.assert_close(decoded, full, atol=1e-4, rtol=0)
        rows.reorder(torch.tensor([1, 1, 0]))
        assert rows.batch == 3
        torch.testing.assert_close(rows.keys[:, 0], rows.keys[:, 1])
        torch.testing.assert_close(rows.keys[:, 2, :, :6], snapshot.keys[:, 0, :, :6])
        cache.reset()
        assert torch.count_nonzero(cache.keys) == 0 and torch.count_nonzero(snapshot.keys) > 0
        with pytest.raises(ValueError, match="KV cache holds 16"):
            model(torch.zeros(1, 11, dtype=torch.long), kv_cache=snapshot, start_pos=6)


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_round_trip(tmp_path, tie):
    model = randomized(small_config(tie_embeddings=tie, qk_norm=True))
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = CM3.from_pretrained(tmp_path / "ckpt", expected_vocab_size=97).eval()
    assert loaded.config == model.config
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert CM3.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16).tok_emb.weight.dtype == torch.bfloat16


def test_vocab_mismatch_and_missing_checkpoint_raise(tmp_path):
    CM3(small_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocab_size 97 but the vocabulary in use has 100"):
        CM3.from_pretrained(tmp_path, expected_vocab_size=100)
    with pytest.raises(FileNotFoundError, match="config.json"):
        CM3.from_pretrained(tmp_path / "nowhere")


def test_tiny_model_overfits_a_fixed_batch():
    """Out-projections start at 0, yet every block learns: the loss on one batch collapses."""
    torch.manual_seed(0)
    model = CM3(small_config())
    ids = torch.randint(0, 97, (2, 17))
    weights = torch.ones(2, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for _ in range(50):
        loss = cm3_loss(model(ids[:, :-1]), ids[:, 1:], weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(block.attn.out.weight.abs().max() > 0 for block in model.blocks)
    assert losses[0] == pytest.approx(torch.log(torch.tensor(97.0)).item(), abs=0.1)
    assert losses[-1] < 0.2 * losses[0], losses[::10]


SEED_EXAMPLE = """
import torch
from cm3.model import CM3
img = torch.randn(1, 3, 256, 256)
caption = torch.randint(0, 20000, (1, 1024))
model = CM3()
output = model(img, caption)
print(output.shape)  # (1, 1024, 20000)
"""


@pytest.mark.slow  # a random 350m model over 2,049 tokens: minutes on a busy 2-core machine
@pytest.mark.timeout(1800)
def test_the_seed_readmes_example_runs_as_written(capsys):
    """The CM3Leon README's usage section, verbatim (without gradients, to spare memory): T is the whole
    caption-first document (1024 caption ids, <break>, 1024 image tokens of the default 256 x 256 VQ-GAN) and V
    the default vocabulary, not the (1, 1024, 20000) of its comment."""
    scope = {}
    with torch.inference_mode():
        exec(SEED_EXAMPLE, scope)
    assert capsys.readouterr().out.strip() == "torch.Size([1, 2049, 65536])"
    model, img, caption = scope["model"], scope["img"], scope["caption"]
    assert num_parameters(model.config) == num_parameters(CM3Config.from_preset("350m"))
    assert sum(p.numel() for p in model.parameters()) == num_parameters(model.config)
    ids = model.document_ids(img, caption)
    vocab = model.vocabulary
    assert ids[0, 1024].item() == vocab.break_ and vocab.is_image(ids[0, 1025:].numpy()).all()
    assert ids[0, :1024].tolist() == vocab.text_ids(caption[0].tolist())
    with pytest.raises(ValueError, match=r"\[0, 56764\).*\[70000\]"):
        model.document_ids(img, torch.tensor([[5, 70000]]))


def test_image_call_uses_the_checkpoints_tokenizer(tmp_path):
    """A cm3 checkpoint that carries a tokenizer lays the image call out in that vocabulary; ids-only calls
    are unchanged."""
    from factories import TINY_F32, captions, make_tokenizer

    from cm3.model.checkpoint import save_checkpoint

    tokenizer = make_tokenizer(tmp_path / "tok", TINY_F32, captions())
    config = CM3Config.from_preset("tiny", vocab_size=tokenizer.vocab.size, n_layers=1, d_model=32, n_heads=2)
    save_checkpoint(tmp_path / "ckpt", CM3(config), tokenizer)
    model = CM3.from_pretrained(tmp_path / "ckpt").eval()
    images = torch.rand(2, 3, 256, 256) * 2 - 1
    caption = torch.tensor([tokenizer.text.encode("a red circle")[:3]] * 2)
    with torch.no_grad():
        logits = model(images, caption)
        vocab = tokenizer.vocab
        expected = torch.tensor([[*vocab.text_ids(row.tolist()), vocab.break_, *image]
                                 for row, image in zip(caption, tokenizer.encode_image(images).tolist())])
        assert torch.equal(logits, model(expected))
    assert logits.shape == (2, 3 + 1 + tokenizer.tokens_per_image, tokenizer.vocab.size)


def test_tokenizer_and_config_load_without_the_weights(tmp_path):
    """What `cm3 serve`'s ingress loads: the checkpoint's own config and tokenizer, even with no weights file."""
    from factories import TINY_F32, captions, make_tokenizer

    from cm3.model.checkpoint import load_checkpoint, load_tokenizer_and_config, save_checkpoint

    tokenizer = make_tokenizer(tmp_path / "tok", TINY_F32, captions())
    config = CM3Config.from_preset("tiny", vocab_size=tokenizer.vocab.size, n_layers=1, d_model=32, n_heads=2)
    save_checkpoint(tmp_path / "ckpt", CM3(config), tokenizer)
    model, full = load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    loaded_config, loaded = load_tokenizer_and_config(tmp_path / "ckpt")
    assert loaded_config == model.config
    assert loaded.vocab.size == full.vocab.size and loaded.tokens_per_image == full.tokens_per_image
    assert loaded.encode_caption("a red circle") == full.encode_caption("a red circle")
    with pytest.raises(FileNotFoundError, match="not a cm3 checkpoint"):
        load_tokenizer_and_config(tmp_path / "tok")
