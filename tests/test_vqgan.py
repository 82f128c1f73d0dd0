"""The VQ-GAN tokenizer: shapes, determinism, taming checkpoint loading, persistence, quantizer loss."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from cm3.tokenizers.vqgan import VQGAN, VQGANConfig, VectorQuantizer

# A tiny taming-style config: two levels, attention at 8x8, a width change (nin_shortcut) each way.
TINY_DD = {"double_z": False, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
           "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}
TINY_TAMING = {"embed_dim": 4, "n_embed": 16, "ddconfig": TINY_DD}


def _taming_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under taming's VQModel key names for TINY_DD, written out independently of our modules."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, out: int, inp: int, k: int) -> None:
        shapes[f"{name}.weight"] = (out, inp, k, k)
        shapes[f"{name}.bias"] = (out,)

    def norm(name: str, c: int) -> None:
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def resnet(name: str, inp: int, out: int) -> None:
        norm(f"{name}.norm1", inp)
        conv(f"{name}.conv1", out, inp, 3)
        norm(f"{name}.norm2", out)
        conv(f"{name}.conv2", out, out, 3)
        if inp != out:
            conv(f"{name}.nin_shortcut", out, inp, 1)

    def attn(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{proj}", c, c, 1)

    # encoder: 32 -> down[0] (16x16, 32 ch) -> downsample -> down[1] (8x8, 64 ch, attention)
    conv("encoder.conv_in", 32, 3, 3)
    resnet("encoder.down.0.block.0", 32, 32)
    conv("encoder.down.0.downsample.conv", 32, 32, 3)
    resnet("encoder.down.1.block.0", 32, 64)
    attn("encoder.down.1.attn.0", 64)
    resnet("encoder.mid.block_1", 64, 64)
    attn("encoder.mid.attn_1", 64)
    resnet("encoder.mid.block_2", 64, 64)
    norm("encoder.norm_out", 64)
    conv("encoder.conv_out", 4, 64, 3)
    conv("quant_conv", 4, 4, 1)
    shapes["quantize.embedding.weight"] = (16, 4)
    conv("post_quant_conv", 4, 4, 1)
    # decoder: up[1] (8x8, attention, upsample) runs first, then up[0] (16x16)
    conv("decoder.conv_in", 64, 4, 3)
    resnet("decoder.mid.block_1", 64, 64)
    attn("decoder.mid.attn_1", 64)
    resnet("decoder.mid.block_2", 64, 64)
    for j in range(2):
        resnet(f"decoder.up.1.block.{j}", 64, 64)
        attn(f"decoder.up.1.attn.{j}", 64)
    conv("decoder.up.1.upsample.conv", 64, 64, 3)
    resnet("decoder.up.0.block.0", 64, 32)
    resnet("decoder.up.0.block.1", 32, 32)
    norm("decoder.norm_out", 32)
    conv("decoder.conv_out", 3, 32, 3)
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator) * 0.1 for k, s in shapes.items()}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _tiny() -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(VQGANConfig.from_taming(TINY_TAMING)).eval()


def test_default_config_is_cm3leon_f8_with_1024_tokens() -> None:
    cfg = VQGANConfig()
    assert (cfg.downsample_factor, cfg.grid_size, cfg.tokens_per_image) == (8, 32, 1024)
    assert VQGANConfig.preset("f8-8192") == cfg
    assert VQGANConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    demo = VQGANConfig.preset("demo")
    assert demo.tokens_per_image == 64 and demo.resolution == 256
    assert demo.fsq_levels and demo.patch_size == 32 and demo.n_embed == 4375  # FSQ and a patch stem: demo only
    assert demo.stem_kernel == 1 and cfg.stem_kernel == 3  # one token per 32x32 cell, embedded linearly
    assert not cfg.fsq_levels and cfg.patch_size == 1  # the default is taming's layout exactly
    assert demo.norm == "channel" and cfg.norm == "group"
    assert VQGANConfig.from_dict(demo.to_dict()) == demo
    with pytest.raises(ValueError, match="unknown preset"):
        VQGANConfig.preset("nope")


def test_f8_model_encodes_256_images_to_1024_codes_and_back() -> None:
    torch.manual_seed(0)
    # default multipliers, attention at 32x32 and 8192 codes; narrower so it runs in seconds
    cfg = VQGANConfig(ch=16, num_res_blocks=1, z_channels=16, embed_dim=16, norm_groups=16)
    model = VQGAN(cfg).eval()
    state = model.state_dict()
    assert state["quantize.embedding.weight"].shape == (8192, 16)
    assert state["encoder.down.3.attn.0.q.weight"].shape == (64, 64, 1, 1)
    assert state["decoder.up.3.attn.1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert state["decoder.up.3.upsample.conv.weight"].shape == (64, 64, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in state and "decoder.up.0.upsample.conv.weight" not in state
    images = _images(2, 256)
    codes = model.encode(images, batch_size=1)
    assert codes.shape == (2, 32, 32) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 8192
    assert torch.equal(codes, model.encode(images))  # deterministic and batch-size independent
    recon = model.decode(codes)
    assert recon.shape == (2, 3, 256, 256)
    assert recon.min() >= -1 and recon.max() <= 1


def test_forward_returns_reconstruction_loss_and_indices_with_grad() -> None:
    model = _tiny().train()
    recon, loss, indices = model(_images(2, 16))
    assert recon.shape == (2, 3, 16, 16) and indices.shape == (2, 8, 8) and loss.ndim == 0
    (recon.mean() + loss).backward()
    assert model.encoder.conv_in.weight.grad is not None  # straight-through reaches the encoder
    assert model.quantize.embedding.weight.grad is not None


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors", "pth"])
def test_from_taming_loads_taming_key_layout(tmp_path, fmt: str) -> None:
    state = _taming_state_dict()
    path = tmp_path / f"model.{fmt}"
    if fmt == "ckpt":  # Lightning layout, with the discriminator and LPIPS that must be ignored
        extra = {"loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4),
                 "loss.perceptual_loss.lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}
        torch.save({"state_dict": {**state, **extra}, "global_step": 7, "epoch": 1}, path)
    elif fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = VQGAN.from_taming(path, TINY_TAMING)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    codes = model.encode(_images(2, 16))
    assert codes.shape == (2, 8, 8) and codes.max() < 16


def test_from_taming_reads_a_taming_yaml_config(tmp_path) -> None:
    yaml_path = tmp_path / "model.yaml"
    yaml_path.write_text(yaml.safe_dump({"model": {
        "base_learning_rate": 4.5e-6,
        "target": "taming.models.vqgan.VQModel",
        "params": {**TINY_TAMING, "lossconfig": {
            "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            "params": {"disc_start": 10000}}},
    }}))
    path = tmp_path / "model.safetensors"
    save_file(_taming_state_dict(1), str(path))
    model = VQGAN.from_taming(path, yaml_path)
    assert model.config.attn_resolutions == (8,) and model.config.n_embed == 16
    assert VQGANConfig.from_taming({"params": TINY_TAMING}) == model.config
    assert VQGANConfig.from_taming(TINY_TAMING) == model.config


def test_from_taming_rejects_missing_unexpected_and_misshaped_keys(tmp_path) -> None:
    state = _taming_state_dict()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "encoder.mid.attn_1.q.weight"},
                    "encoder.mid.attn_1.q.weight"),
        "unexpected": ({**state, "encoder.mid.attn_2.q.weight": torch.zeros(64, 64, 1, 1)},
                       "encoder.mid.attn_2.q.weight"),
        "shape": ({**state, "quantize.embedding.weight": torch.zeros(32, 4)},
                  r"quantize.embedding.weight.*\(32, 4\).*\(16, 4\)"),
    }
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(bad, str(path))
        with pytest.raises(ValueError, match=message):
            VQGAN.from_taming(path, TINY_TAMING)


def test_from_taming_never_unpickles_objects(tmp_path) -> None:
    import argparse

    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": _taming_state_dict(), "hparams": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(ValueError, match="tensors-only"):
        VQGAN.from_taming(path, TINY_TAMING)


def test_save_and_load_pretrained_round_trip(tmp_path) -> None:
    model = _tiny()
    images = _images(3, 16)
    model.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    again = VQGAN.from_pretrained(tmp_path / "tok")
    assert again.config == model.config
    assert torch.equal(again.encode(images), model.encode(images))
    assert torch.equal(again.decode(model.encode(images)), model.decode(model.encode(images)))


def test_decode_rejects_out_of_range_codes() -> None:
    with pytest.raises(ValueError, match="codes must lie"):
        _tiny().decode(torch.full((1, 8, 8), 16))


def test_legacy_and_new_quantizer_losses_weight_the_two_terms_differently() -> None:
    """Same loss value, (1 + beta) * mse; legacy puts weight 1 on commitment (encoder) and beta on the codebook."""
    beta = 0.25
    grads = {}
    for legacy in (True, False):
        torch.manual_seed(0)
        quantizer = VectorQuantizer(8, 4, beta, legacy)
        quantizer.embedding.weight.data.normal_()
        z = torch.randn(2, 4, 3, 3, requires_grad=True)
        z_q, loss, indices = quantizer(z)
        mse = ((quantizer.lookup(indices) - z) ** 2).mean()
        assert torch.allclose(loss, (1 + beta) * mse)
        assert torch.allclose(z_q, quantizer.lookup(indices))
        loss.backward()
        grads[legacy] = (z.grad.clone(), quantizer.embedding.weight.grad.clone())
    (z_legacy, e_legacy), (z_new, e_new) = grads[True], grads[False]
    assert torch.allclose(z_legacy, z_new / beta)
    assert torch.allclose(e_legacy, e_new * beta)
    assert not torch.allclose(z_legacy, z_new)


def test_cosine_quantizer_uses_unit_codes_and_keeps_the_taming_keys() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 4, 0.25, True, l2_normalize=True)
    quantizer.embedding.weight.data.normal_()
    assert set(quantizer.state_dict()) == {"embedding.weight"}  # no extra buffers: taming layout unchanged
    z = torch.randn(2, 4, 3, 3) * 5
    z_q, loss, indices = quantizer(z)
    assert torch.allclose(z_q.norm(dim=1), torch.ones(2, 3, 3), atol=1e-5)
    codes = torch.nn.functional.normalize(quantizer.embedding.weight, dim=1)
    expected = (torch.nn.functional.normalize(z, dim=1).permute(0, 2, 3, 1) @ codes.t()).argmax(-1)
    assert torch.equal(indices, expected) and torch.equal(quantizer.nearest(z), expected)


def test_compiled_inference_agrees_with_eager_and_keeps_taming_keys(tmp_path) -> None:
    model = _tiny()
    images = _images(4, 16)
    eager_codes, eager_images = model.encode(images), model.decode(model.encode(images))
    keys = set(model.state_dict())
    model.for_inference("cpu", compile=True)
    codes = model.encode(images, batch_size=3)  # two batch shapes: 3 and 1
    assert (codes == eager_codes).float().mean() >= 0.95  # fused kernels may flip a near-tie, no more
    assert torch.allclose(model.decode(eager_codes), eager_images, atol=1e-4)
    assert set(model.state_dict()) == keys  # compiled callables are not submodules
    model.save_pretrained(tmp_path / "tok")
    assert torch.equal(VQGAN.from_pretrained(tmp_path / "tok").decode(eager_codes), eager_images)


def test_patch_stem_runs_no_convolution_at_full_resolution() -> None:
    torch.manual_seed(0)
    config = VQGANConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), z_channels=8, embed_dim=8,
                         n_embed=32, resolution=32, norm_groups=8, patch_size=4)
    assert config.downsample_factor == 8 and config.grid_size == 4 and config.tokens_per_image == 16
    model = VQGAN(config).eval()
    state = model.state_dict()
    assert state["encoder.conv_in.weight"].shape == (16, 3 * 16, 3, 3)  # 4x4 pixel patches as channels
    assert state["decoder.conv_out.weight"].shape == (3 * 16, 16, 3, 3)
    assert "encoder.down.1.attn.0.q.weight" in state  # attention at trunk resolution 4 (= 32 / 4 / 2)
    seen = []
    model.encoder.conv_in.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    codes = model.encode(_images(2, 32))
    assert seen == [(2, 48, 8, 8)]  # the first convolution already runs at a quarter of the resolution
    assert codes.shape == (2, 4, 4)
    assert model.decode(codes).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="patch_size"):
        VQGANConfig(patch_size=0)


def test_linear_patch_stem_embeds_each_patch_on_its_own() -> None:
    """stem_kernel=1: the encoder's first convolution sees one patch only, so changing the pixels of one patch
    changes its first activations and no other patch's."""
    torch.manual_seed(0)
    config = VQGANConfig(ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), z_channels=8, embed_dim=3,
                         n_embed=27, fsq_levels=(3, 3, 3), resolution=32, norm_groups=8, patch_size=8,
                         stem_kernel=1)
    model = VQGAN(config).eval()
    assert model.state_dict()["encoder.conv_in.weight"].shape == (16, 3 * 64, 1, 1)
    assert model.state_dict()["decoder.conv_out.weight"].shape == (3 * 64, 16, 1, 1)
    seen = []
    model.encoder.conv_in.register_forward_hook(lambda module, args, out: seen.append(out))
    images = _images(1, 32)
    changed = images.clone()
    changed[:, :, :8, :8] = -changed[:, :, :8, :8]  # the top-left patch only
    with torch.no_grad():
        model.encode(images), model.encode(changed)
    differs = (seen[0] - seen[1]).abs().amax(dim=1)[0] > 0
    assert differs[0, 0] and differs.sum() == 1
    assert model.decode(model.encode(images)).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="stem_kernel"):
        VQGANConfig(stem_kernel=5)


def test_fsq_numbers_every_grid_point_once_and_round_trips() -> None:
    from cm3.tokenizers.vqgan import FiniteScalarQuantizer

    quantizer = FiniteScalarQuantizer((8, 5, 3))
    codes = quantizer.codes()
    assert codes.shape == (120, 3) and len(codes.unique(dim=0)) == 120
    assert codes.min() >= -1 and codes.max() <= 1
    z = torch.randn(2, 3, 6, 6) * 3
    z_q, loss, indices = quantizer(z.requires_grad_())
    assert float(loss) == 0.0 and indices.min() >= 0 and indices.max() < 120
    assert torch.equal(indices, quantizer.nearest(z))
    assert torch.allclose(quantizer.lookup(indices), z_q)
    assert torch.equal(quantizer.lookup(indices), codes[indices].permute(0, 3, 1, 2))
    z_q.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # straight-through gradient reaches the encoder
    # a sweep of the latent reaches every level of every channel: (0,0,0), (1,1,1), ... up to each channel's top
    sweep = quantizer.nearest(torch.linspace(-6, 6, 400).expand(3, 400)[None, :, :, None]).flatten()
    for basis, levels in ((1, 8), (8, 5), (40, 3)):
        assert set(((sweep // basis) % levels).tolist()) == set(range(levels))


def test_fsq_config_is_checked_and_saved(tmp_path) -> None:
    with pytest.raises(ValueError, match="fsq_levels"):
        VQGANConfig(fsq_levels=(8, 8), n_embed=64, embed_dim=3)
    config = VQGANConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8, embed_dim=3,
                         n_embed=512, resolution=16, norm_groups=8, fsq_levels=(8, 8, 8))
    torch.manual_seed(0)
    model = VQGAN(config).eval()
    assert not any("quantize" in key for key in model.state_dict())  # FSQ has no parameters
    images = _images(2, 16)
    model.save_pretrained(tmp_path / "fsq")
    again = VQGAN.from_pretrained(tmp_path / "fsq")
    assert again.config == config and again.config.fsq_levels == (8, 8, 8)
    assert torch.equal(again.encode(images), model.encode(images))


def test_channel_norm_keeps_the_keys_and_makes_codes_depend_only_on_their_neighbourhood() -> None:
    group = VQGANConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8, embed_dim=8,
                        n_embed=32, resolution=64, norm_groups=8)
    channel = VQGANConfig(**{**group.to_dict(), "norm": "channel"})
    assert (group.groups, channel.groups) == (8, 0)
    shapes = {k: v.shape for k, v in VQGAN(group).state_dict().items()}
    assert {k: v.shape for k, v in VQGAN(channel).state_dict().items()} == shapes  # same weights file layout

    images = _images(1, 64)
    changed = images.clone()
    changed[..., 48:, 48:] = -changed[..., 48:, 48:]  # repaint the bottom-right corner only
    for config, local in ((channel, True), (group, False)):
        torch.manual_seed(0)
        model = VQGAN(config).eval()
        seen = []
        model.encoder.down[1].block[0].register_forward_hook(lambda module, args, out: seen.append(out[..., :8, :8]))
        with torch.no_grad():
            model.encode(images), model.encode(changed)
        # the convolutions' receptive field at the top left ends far from the corner: only GroupNorm's image-wide
        # statistics carry the change there (the mid block's attention, taming's layout, is global in both)
        assert torch.equal(*seen) == local
    with pytest.raises(ValueError, match="norm must be one of"):
        VQGANConfig(norm="batch")
