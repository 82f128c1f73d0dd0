"""VQ-GAN training on raw shards: a tiny run learns and reports, resumes, revives dead codes; metrics; LPIPS."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cm3.synthetic import shapes
from cm3.tokenizers.vq_data import is_heldout, load_images, random_batch
from cm3.tokenizers.vq_losses import LPIPS
from cm3.tokenizers.vq_metrics import evaluate, psnr, ssim
from cm3.tokenizers.training_options import TrainOptions, demo_training_options
from cm3.tokenizers.vq_training import CodebookTracker, _lr_factor, train_vqgan
from cm3.tokenizers.vqgan import VQGAN, VQGANConfig

from conftest import cm3

SIZE = 32
TINY = VQGANConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8, embed_dim=8,
                   n_embed=32, resolution=SIZE, norm_groups=8)
FAST = TrainOptions(crop_size=None, log_every=5, checkpoint_every=30, restart_every=5, dead_code_steps=5,
                    usage_window=10)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Two raw shards as `cm3 ingest` writes them: 32 demo images plus one failed row without bytes."""
    folder = tmp_path_factory.mktemp("raw")
    for shard in range(2):
        rows = []
        for index in range(shard * 16, shard * 16 + 16):
            spec = shapes.spec_for(index)
            jpg = shapes.encode_jpeg(shapes.render(spec, size=SIZE))
            rows.append({"key": f"{index:08d}", "jpg": jpg, "status": "success", "caption": spec.caption})
        rows.append({"key": "broken", "jpg": None, "status": "failed_to_download", "caption": "x"})
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
    return folder


def test_load_images_skips_failed_rows(raw) -> None:
    keys, images = load_images(raw, SIZE)
    assert len(keys) == 32 and "broken" not in keys
    assert images.shape == (32, 3, SIZE, SIZE) and images.dtype == torch.uint8


def test_heldout_split_is_deterministic_by_key() -> None:
    keys = [f"{i:08d}" for i in range(2000)]
    held = [k for k in keys if is_heldout(k, 0.05)]
    assert held == [k for k in keys if is_heldout(k, 0.05)]
    assert 60 < len(held) < 140


def test_tiny_run_learns_checkpoints_and_reports(raw, tmp_path) -> None:
    report = train_vqgan(raw, tmp_path, TINY, heldout_fraction=0.25, progress=False,
                         options=replace(FAST, steps=60, batch_size=4, lr=3e-3))
    losses = [h["rec_loss"] for h in report["history"]]
    assert losses[-1] < 0.7 * losses[0], losses
    assert report["steps"] == 60 and report["heldout_images"] > 0
    assert 10 < report["heldout_psnr_db"] < 60
    assert 0 < report["heldout_ssim"] <= 1
    assert 0 < report["heldout_codebook_usage"] <= 1 and 0 < report["train_codebook_usage"] <= 1
    assert report["images_per_second"] > 0 and report["seconds"] > 0
    assert report["dead_code_restarts"] > 0  # the first batch seeds the codebook
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 60
    checkpoint = tmp_path / "checkpoint"
    assert {"model.safetensors", "config.json", "training_state.pt", "training_state.json"} <= {
        p.name for p in checkpoint.iterdir()}
    model = VQGAN.from_pretrained(checkpoint)
    assert model.config == TINY
    _, images = load_images(raw, SIZE)
    assert evaluate(model, images[:4])["psnr"] > 10
    grid = Image.open(tmp_path / "reconstructions.png")
    rows = min(8, report["heldout_images"])
    assert grid.size == (rows * SIZE, 2 * SIZE)


def test_resume_continues_from_the_saved_step_with_the_gan_on(raw, tmp_path) -> None:
    options = replace(FAST, disc_start=4, disc_channels=8, disc_layers=2, batch_size=2)
    first = train_vqgan(raw, tmp_path, TINY, progress=False, options=replace(options, steps=6))
    assert first["steps"] == 6 and first["resumed_from_step"] is None
    weights = VQGAN.from_pretrained(tmp_path / "checkpoint").state_dict()
    second = train_vqgan(raw, tmp_path, TINY, progress=False, options=replace(options, steps=9))
    assert second["resumed_from_step"] == 6 and second["steps"] == 9 and second["steps_this_run"] == 3
    assert json.loads((tmp_path / "checkpoint" / "training_state.json").read_text())["step"] == 9
    after = VQGAN.from_pretrained(tmp_path / "checkpoint").state_dict()
    assert any(not torch.equal(weights[k], after[k]) for k in weights)
    with pytest.raises(ValueError, match="different config"):
        train_vqgan(raw, tmp_path, VQGANConfig(**{**TINY.to_dict(), "n_embed": 64}), progress=False,
                    options=TrainOptions(steps=10))


def test_dead_codes_are_restarted_from_recent_latents() -> None:
    model = VQGAN(TINY)
    optimizer = torch.optim.Adam(model.parameters())
    model.quantize.embedding.weight.sum().backward()  # gives every code Adam state
    optimizer.step()
    tracker = CodebookTracker(TINY.n_embed, step=0)
    tracker.update(torch.tensor([0, 1, 2]), step=20)
    before = model.quantize.embedding.weight.detach().clone()
    latents = torch.randn(50, TINY.embed_dim) * 3
    restarted = tracker.restart_dead(model, optimizer, latents, step=20, dead_after=10,
                                     generator=torch.Generator().manual_seed(0))
    after = model.quantize.embedding.weight.detach()
    assert restarted == TINY.n_embed - 3
    assert torch.equal(after[:3], before[:3])  # live codes untouched
    nearest = torch.cdist(after[3:], latents).min(1).values
    assert nearest.max() < 0.2  # each revived code sits on a recent encoder output
    state = optimizer.state[model.quantize.embedding.weight]
    assert state["exp_avg"][3:].abs().sum() == 0 and state["exp_avg"][:3].abs().sum() > 0
    assert tracker.usage(step=20, window=5) == pytest.approx(1.0)  # revived codes count as fresh
    assert tracker.restart_dead(model, optimizer, latents, 21, 10, torch.Generator()) == 0


def test_psnr_and_ssim_known_values() -> None:
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.isinf(psnr(images, images)).all()
    assert torch.allclose(ssim(images, images), torch.ones(2))
    shifted = images.clone()
    shifted[:, :, :, :] = 0.0
    offset = shifted + 10 / 127.5  # a uniform error of 10 grey levels
    assert torch.allclose(psnr(shifted, offset), torch.full((2,), 20 * torch.log10(torch.tensor(25.5))), atol=1e-3)
    noisy = (images + 0.3 * torch.randn_like(images)).clamp(-1, 1)
    assert (ssim(images, noisy) < 0.9).all() and (psnr(images, noisy) < 25).all()


def test_missing_lpips_weights_is_a_clear_error(raw, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="LPIPS weights file not found.*nothing is downloaded"):
        train_vqgan(raw, tmp_path / "out", TINY, lpips_weights=tmp_path / "vgg.pth", progress=False,
                    options=TrainOptions(steps=1))


def test_lpips_reads_local_weights_and_measures_distance(tmp_path) -> None:
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in make_layers(cfgs["D"])[:30].state_dict().items()}
    state |= {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS.WIDTHS)}
    path = tmp_path / "lpips.safetensors"
    save_file(state, str(path))
    lpips = LPIPS(path)
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lpips(a, a), torch.zeros(2))
    assert (lpips(a, b) > 0).all()
    del state["lin4.model.1.weight"]
    save_file(state, str(path))
    with pytest.raises(ValueError, match="lin4.model.1.weight"):
        LPIPS(path)


def test_cosine_codebook_does_not_collapse_on_a_tiny_run(raw, tmp_path) -> None:
    """The demo preset's l2-normalised codebook with frequent dead-code restarts keeps many codes in use."""
    config = VQGANConfig(**{**TINY.to_dict(), "l2_normalize": True})
    options = replace(FAST, codebook_weight=0.25, restart_every=5, dead_code_steps=10, steps=30, batch_size=4,
                      lr=3e-3)
    report = train_vqgan(raw, tmp_path, config, heldout_fraction=0.25, progress=False, options=options)
    assert report["train_codebook_usage"] >= 0.25, report["train_codebook_usage"]
    assert report["heldout_codebook_usage"] >= 0.1, report["heldout_codebook_usage"]
    model = VQGAN.from_pretrained(tmp_path / "checkpoint")
    assert model.quantize.l2_normalize
    codes = model.quantize.codes()
    assert torch.allclose(codes.norm(dim=1), torch.ones(len(codes)), atol=1e-5)


def test_busiest_crop_keeps_the_shape_and_a_plain_share_keeps_background() -> None:
    spec = shapes.ShapeSpec("square", "red", "small", "top left", "white", cx=40.0, cy=40.0, radius=24.0)
    image = torch.from_numpy(np.asarray(shapes.render(spec))).permute(2, 0, 1)[None]
    generator = torch.Generator().manual_seed(0)
    plain = random_batch(image.expand(64, -1, -1, -1), 64, 64, generator, candidates=1)
    busiest = random_batch(image.expand(64, -1, -1, -1), 64, 64, generator, candidates=8)
    assert plain.shape == busiest.shape == (64, 3, 64, 64)

    def has_shape(batch: torch.Tensor) -> torch.Tensor:  # any red pixel: a white crop is all > 0.9
        return (batch[:, 1] < 0).flatten(1).any(1).float()

    assert has_shape(busiest).mean() > has_shape(plain).mean() + 0.3
    mixed = random_batch(image.expand(64, -1, -1, -1), 64, 64, generator, candidates=8, plain_share=0.5)
    assert mixed.shape == (64, 3, 64, 64)  # first half plain crops (background too), second half the busiest
    assert has_shape(mixed[32:]).mean() > has_shape(mixed[:32]).mean() + 0.3


def test_fsq_tiny_run_learns_without_codebook_restarts(raw, tmp_path) -> None:
    config = VQGANConfig(**{**TINY.to_dict(), "embed_dim": 3, "fsq_levels": (4, 4, 2), "patch_size": 2,
                            "ch_mult": (1, 2)})
    assert config.tokens_per_image == TINY.tokens_per_image  # 2x2 patches + one halving = TINY's three levels
    report = train_vqgan(raw, tmp_path, config, heldout_fraction=0.25, progress=False,
                         options=replace(FAST, steps=40, batch_size=4, lr=3e-3))
    losses = [h["rec_loss"] for h in report["history"]]
    assert losses[-1] < 0.7 * losses[0], losses
    assert report["dead_code_restarts"] == 0
    assert report["train_codebook_usage"] >= 0.25, report["train_codebook_usage"]
    assert VQGAN.from_pretrained(tmp_path / "checkpoint").config == config


def test_ema_weights_are_saved_and_evaluated_and_resume_keeps_both(raw, tmp_path) -> None:
    plain = replace(FAST, batch_size=2, lr=3e-3)
    options = replace(plain, ema_decay=0.9, checkpoint_every=100)
    run = dict(heldout_fraction=0.25, progress=False)
    first = train_vqgan(raw, tmp_path, TINY, options=replace(options, steps=8), **run)
    saved = VQGAN.from_pretrained(tmp_path / "checkpoint")
    raw_weights = torch.load(tmp_path / "checkpoint" / "training_state.pt", weights_only=True)["raw_model"]
    assert any(not torch.equal(saved.state_dict()[k], raw_weights[k]) for k in raw_weights)  # average != raw
    keys, images = load_images(raw, SIZE)
    held = torch.tensor([is_heldout(k, 0.25) for k in keys])
    assert held.any()
    assert evaluate(saved.eval(), images[held])["psnr"] == pytest.approx(first["heldout_psnr_db"], abs=1e-4)

    second = train_vqgan(raw, tmp_path, TINY, options=replace(options, steps=10), **run)
    assert second["resumed_from_step"] == 8
    resumed = torch.load(tmp_path / "checkpoint" / "training_state.pt", weights_only=True)["raw_model"]
    assert any(not torch.equal(resumed[k], raw_weights[k]) for k in raw_weights)  # training went on from the raw ones

    train_vqgan(raw, tmp_path / "plain", TINY, options=replace(plain, steps=2), **run)
    with pytest.raises(ValueError, match="without ema_decay"):
        train_vqgan(raw, tmp_path / "plain", TINY, options=replace(options, steps=4), **run)
    with pytest.raises(ValueError, match="ema_decay must be in"):
        train_vqgan(raw, tmp_path / "bad", TINY, options=replace(plain, steps=2, ema_decay=1.0), **run)


def test_device_argument_trains_the_same_batches_and_the_cli_refuses_a_missing_gpu(raw, tmp_path) -> None:
    options = replace(FAST, steps=4, batch_size=2)
    default = train_vqgan(raw, tmp_path / "default", TINY, progress=False, options=options)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        report = train_vqgan(raw, tmp_path / device, TINY, progress=False, options=options, device=device)
        assert report["steps"] == 4
        weights = VQGAN.from_pretrained(tmp_path / device / "checkpoint").state_dict()
        expected = VQGAN.from_pretrained(tmp_path / "default" / "checkpoint").state_dict()
        if device == "cpu":  # the same seed draws the same batches: bit-identical on the same device
            assert all(torch.equal(weights[k], expected[k]) for k in expected)
            assert report["heldout_psnr_db"] == default["heldout_psnr_db"]
    if not torch.cuda.is_available():
        proc = cm3("tokenizer", "train-vq", "--data", str(raw), "--out", str(tmp_path / "gpu"), "--preset", "demo",
                   "--steps", "1", "--device", "cuda")
        assert proc.returncode == 2 and "--device 'cuda'" in proc.stderr and "no CUDA GPU" in proc.stderr
        assert not (tmp_path / "gpu" / "checkpoint").exists()


def test_learning_rate_warms_up_linearly_and_the_cli_sets_the_warm_up(raw, tmp_path) -> None:
    options = TrainOptions(warmup_steps=100, min_lr_fraction=0.05)
    assert _lr_factor(0, 0.0, options) == pytest.approx(0.01)
    assert _lr_factor(49, 0.0, options) == pytest.approx(0.5)
    assert _lr_factor(99, 0.0, options) == pytest.approx(1.0)
    assert _lr_factor(5000, 1.0, options) == pytest.approx(0.05)  # cosine floor at the end of the budget
    for flags, expected in (([], demo_training_options().warmup_steps), (["--warmup-steps", "7"], 7)):
        out = tmp_path / f"warmup{expected}"
        proc = cm3("tokenizer", "train-vq", "--data", str(raw), "--out", str(out), "--preset", "demo", "--steps", "1",
                   "--threads", "1", "--no-progress", *flags)
        assert proc.returncode == 0, proc.stderr
        assert json.loads((out / "report.json").read_text())["settings"]["warmup_steps"] == expected
