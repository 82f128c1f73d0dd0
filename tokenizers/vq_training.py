"""Train the VQ-GAN tokenizer on raw ingest shards with plain PyTorch.

Taming's recipe (reconstruction + codebook loss, optional LPIPS, PatchGAN with hinge loss and an
adaptive weight after ``disc_start``) plus dead-code restarts, a wall-clock budget, atomic
checkpoints with resume, and a held-out report (PSNR, SSIM, codebook usage, reconstructions.png).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cm3.tokenizers.training_options import TrainOptions
from cm3.tokenizers.vqgan import VQGAN, VQGANConfig, atomic_path, codebook_usage

CHECKPOINT_DIR = "checkpoint"
STATE_TENSORS = "training_state.pt"
STATE_JSON = "training_state.json"


# --- data ---------------------------------------------------------------------------------------


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
            arrays.append(_decode(jpg, resolution))
    if not arrays:
        raise ValueError(f"no usable images (status == 'success' with jpg bytes) in {data}")
    return keys, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _decode(jpg: bytes, resolution: int) -> np.ndarray:
    image = Image.open(io.BytesIO(jpg)).convert("RGB")
    if image.size != (resolution, resolution):  # centre square crop, then resize
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic split by key hash, stable across runs, machines and shard orders."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return digest / 2**64 < fraction


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


# --- metrics ------------------------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on the [0, 255] scale of images in [-1, 1]; inf for identical images."""
    mse = ((a.float() - b.float()) * 127.5).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 gaussian window, sigma 1.5, K1 .01, K2 .03) on [0, 255]."""
    x, y = (t.float().add(1).mul(127.5) for t in (a, b))
    channels = x.shape[1]
    coords = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def evaluate(model: VQGAN, images: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """Round-trip images (float [-1, 1] or uint8) through the tokenizer; mean PSNR/SSIM and code usage."""
    if images.dtype == torch.uint8:
        images = to_float(images)
    was_training = model.training
    model.eval()
    codes = model.encode(images, batch_size=batch_size)
    recon = model.decode(codes, batch_size=batch_size).cpu()
    model.train(was_training)
    # score the 8-bit images a user would see
    recon = to_float(to_uint8(recon))
    return {
        "psnr": float(psnr(images, recon).mean()),
        "ssim": float(ssim(images, recon).mean()),
        "codebook_usage": codebook_usage(codes, model.config.n_embed),
    }


# --- perceptual loss and discriminator ----------------------------------------------------------


class LPIPS(nn.Module):
    """LPIPS-style distance: unit-normalised VGG16 features, squared differences, 1x1 linear heads.

    Weights come from one local file (safetensors or tensors-only torch file) holding torchvision
    VGG16 ``features.*`` keys and heads ``lin0..lin4.model.1.weight`` ([1, C, 1, 1], LPIPS's layout).
    """

    TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    WIDTHS = (64, 128, 256, 512, 512)

    def __init__(self, weights_path: str | os.PathLike[str]):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights file not found: {path} (nothing is downloaded; "
                                    "pass lpips_weights=None to train without the perceptual loss)")
        state = _read_tensors(path)
        self.features = make_layers(cfgs["D"])[: self.TAPS[-1] + 1]  # vgg16().features without the classifier
        self.heads = nn.ParameterList(nn.Parameter(torch.empty(1, w, 1, 1)) for w in self.WIDTHS)
        wanted = {f"features.{k}": v for k, v in self.features.state_dict().items()}
        wanted |= {f"lin{i}.model.1.weight": h for i, h in enumerate(self.heads)}
        missing = sorted(k for k in wanted if k not in state)
        if missing:
            raise ValueError(f"{path} lacks LPIPS weights: {missing}")
        with torch.no_grad():
            for key, target in wanted.items():
                if state[key].shape != target.shape:
                    raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, "
                                     f"expected {tuple(target.shape)}")
                target.copy_(state[key])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance per image [B] between images in [-1, 1]."""
        h = torch.cat([a, b]).sub(self.shift).div(self.scale)
        total = a.new_zeros(a.shape[0])
        taps = iter(zip(self.TAPS, self.heads))
        tap, head = next(taps)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == tap:
                fa, fb = (f / (f.norm(dim=1, keepdim=True) + 1e-10) for f in h.chunk(2))
                total = total + F.conv2d((fa - fb) ** 2, head).mean((1, 2, 3))
                tap, head = next(taps, (None, None))
        return total


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): stride-2 4x4 convs with BatchNorm and LeakyReLU, one logit per patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            width = out
        seq.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Taming's GAN weight: balance the two losses' gradient norms at the decoder's last layer."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


# --- codebook usage and restarts ----------------------------------------------------------------


class CodebookTracker:
    """When each code was last chosen; finds dead codes and re-seeds them from encoder outputs."""

    def __init__(self, n_embed: int, step: int = 0):
        self.last_used = torch.full((n_embed,), step, dtype=torch.long)

    def update(self, indices: torch.Tensor, step: int) -> None:
        self.last_used[indices.flatten().unique().cpu()] = step

    def usage(self, step: int, window: int) -> float:
        """Fraction of codes chosen within the last ``window`` steps."""
        return float(((step - self.last_used) < window).float().mean())

    def restart_dead(self, model: VQGAN, optimizer: torch.optim.Optimizer, latents: torch.Tensor,
                     step: int, dead_after: int, generator: torch.Generator) -> int:
        """Set codes unused for ``dead_after`` steps to random recent latents [N, D]; returns how many."""
        dead = torch.nonzero(step - self.last_used >= dead_after).flatten()
        if dead.numel() == 0 or latents.numel() == 0:
            return 0
        weight = model.quantize.embedding.weight
        pick = torch.randint(latents.shape[0], (dead.numel(),), generator=generator)
        noise = torch.randn(dead.numel(), latents.shape[1], generator=generator) * latents.std() * 0.01
        with torch.no_grad():
            weight[dead.to(weight.device)] = (latents[pick] + noise).to(weight)
        state = optimizer.state.get(weight, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                state[name][dead.to(weight.device)] = 0.0
        self.last_used[dead] = step
        return int(dead.numel())


# --- checkpoints --------------------------------------------------------------------------------


def save_checkpoint(out_dir: Path, model: VQGAN, state: dict[str, Any], info: dict[str, Any]) -> None:
    """Write a complete checkpoint into a temp folder, then swap it in, so a crash leaves one whole copy."""
    final = out_dir / CHECKPOINT_DIR
    tmp, old = out_dir / f".{CHECKPOINT_DIR}.tmp", out_dir / f".{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(state, tmp / STATE_TENSORS)
    (tmp / STATE_JSON).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint, including one left aside by a crash mid-swap."""
    for candidate in (out_dir / CHECKPOINT_DIR, out_dir / f".{CHECKPOINT_DIR}.old"):
        if (candidate / STATE_JSON).is_file():
            return candidate
    return None


# --- training -----------------------------------------------------------------------------------


class WeightAverage:
    """An exponential moving average of a model's weights, kept in a second copy of the model."""

    def __init__(self, model: VQGAN, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        device = next(model.parameters()).device
        self.model = VQGAN(model.config).to(device, memory_format=torch.channels_last)
        self.model.load_state_dict(model.state_dict())
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: VQGAN, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for averaged, current in zip(self.model.parameters(), model.parameters()):
            averaged.lerp_(current, 1.0 - decay)


def _lr_factor(step: int, progress: float, options: TrainOptions) -> float:
    warm = min(1.0, (step + 1) / max(1, options.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return warm * (options.min_lr_fraction + (1 - options.min_lr_fraction) * cosine)


def _batch(images: torch.Tensor, batch_size: int, crop: int | None, generator: torch.Generator,
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


def train_vqgan(
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: VQGANConfig,
    *,
    seconds_budget: float | None = None,
    heldout_fraction: float = 0.05,
    seed: int = 0,
    lpips_weights: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = True,
    options: TrainOptions | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Train until ``options.steps`` or ``seconds_budget`` (training wall clock), checkpoint, evaluate, report.

    On ``device="cuda"`` the models train there in float32 (the images stay in CPU memory as uint8 and each
    batch is drawn there with the same generator, so a seed gives the same batches on any device)."""
    options = options or TrainOptions()
    device = torch.device(device)
    previous_threads = torch.get_num_threads()
    if options.num_threads:
        torch.set_num_threads(options.num_threads)
    try:
        return _train(data, Path(out_dir), config, seconds_budget, heldout_fraction, seed, lpips_weights, resume,
                      progress, options, device)
    finally:
        torch.set_num_threads(previous_threads)


def _train(data: str | os.PathLike[str], out: Path, config: VQGANConfig, seconds_budget: float | None,
           heldout_fraction: float, seed: int, lpips_weights: str | os.PathLike[str] | None, resume: bool,
           progress: bool, options: TrainOptions, device: torch.device) -> dict[str, Any]:
    steps, batch_size, lr = options.steps, options.batch_size, options.lr
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    perceptual = LPIPS(lpips_weights).to(device) if lpips_weights is not None else None

    keys, images = load_images(data, config.resolution)
    held = torch.tensor([is_heldout(k, heldout_fraction) for k in keys])
    train_images, heldout_images = images[~held], images[held]
    if len(train_images) == 0:
        raise ValueError("every image fell into the held-out split; lower heldout_fraction")

    model = VQGAN(config).to(device, memory_format=torch.channels_last)
    ema = WeightAverage(model, options.ema_decay) if options.ema_decay is not None else None
    disc = PatchDiscriminator(config.out_ch, options.disc_channels, options.disc_layers).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    disc_opt = torch.optim.Adam(disc.parameters(), lr=lr * options.disc_lr_scale, betas=(0.5, 0.9))
    step, elapsed_before = 0, 0.0
    tracker = CodebookTracker(config.n_embed, step=-options.dead_code_steps)  # all dead: seeded at step 1
    checkpoint = find_checkpoint(out) if resume else None
    if checkpoint is not None:
        loaded = VQGAN.from_pretrained(checkpoint)
        if loaded.config != config:
            raise ValueError(f"{checkpoint} was trained with a different config; use another out_dir or resume=False")
        state = torch.load(checkpoint / STATE_TENSORS, map_location="cpu", weights_only=True)
        if ema is not None and "raw_model" not in state:
            raise ValueError(f"{checkpoint} was trained without ema_decay; use another out_dir or resume=False")
        model.load_state_dict(state.get("raw_model", loaded.state_dict()))  # with EMA the saved model is the average
        if ema is not None:
            ema.model.load_state_dict(loaded.state_dict())
        opt.load_state_dict(state["optimizer"])
        disc.load_state_dict(state["discriminator"])
        disc_opt.load_state_dict(state["disc_optimizer"])
        tracker.last_used = state["last_used"]
        generator.set_state(state["generator"])
        info = json.loads((checkpoint / STATE_JSON).read_text())
        step, elapsed_before = int(info["step"]), float(info["seconds"])
    start_step = step

    def checkpoint_now() -> None:
        state = {"optimizer": opt.state_dict(), "discriminator": disc.state_dict(),
                 "disc_optimizer": disc_opt.state_dict(), "last_used": tracker.last_used,
                 "generator": generator.get_state()}
        if ema is not None:
            state["raw_model"] = model.state_dict()
        save_checkpoint(out, ema.model if ema is not None else model, state,
                        {"step": step, "seconds": elapsed(), "config": config.to_dict()})

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    model.train()
    disc.train()
    has_codebook = not config.fsq_levels  # FSQ has no codes to restart
    history: list[dict[str, float]] = []
    window: list[float] = []
    restarts = 0
    started = time.perf_counter()
    while step < steps and (seconds_budget is None or elapsed() < seconds_budget):
        progress_fraction = max(step / steps, elapsed() / seconds_budget if seconds_budget else 0.0)
        for group, base in ((opt.param_groups[0], lr), (disc_opt.param_groups[0], lr * options.disc_lr_scale)):
            group["lr"] = base * _lr_factor(step, progress_fraction, options)
        x = _batch(train_images, batch_size, options.crop_size, generator, options.crop_candidates,
                   options.plain_crop_share).to(device)

        z = model.encode_latent(x)
        z_q, q_loss, indices = model.quantize(z)
        recon = model.decode_latent(z_q)
        rec = options.l1_weight * (x - recon).abs().mean() + options.l2_weight * (x - recon).pow(2).mean()
        nll = rec
        if perceptual is not None:
            nll = nll + options.perceptual_weight * perceptual(x, recon).mean()
        loss = nll + options.codebook_weight * q_loss
        gan_on = step >= options.disc_start
        if gan_on:
            g_loss = -disc(recon).mean()
            d_weight = options.disc_weight * adaptive_weight(nll, g_loss, model.decoder.last_layer)
            loss = loss + d_weight * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update(model, step)
        if gan_on:
            d_loss = hinge_d_loss(disc(x), disc(recon.detach()))
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()

        step += 1
        tracker.update(indices, step)
        if has_codebook and (step % options.restart_every == 0 or step == start_step + 1):
            latents = z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).cpu()
            restarts += tracker.restart_dead(model, opt, latents, step, options.dead_code_steps, generator)
        window.append(float(rec.detach()))
        if step % options.log_every == 0 or step == steps:
            entry = {"step": step, "rec_loss": sum(window) / len(window), "seconds": round(elapsed(), 1),
                     "usage": tracker.usage(step, options.usage_window)}
            history.append(entry)
            window.clear()
            if progress:
                print(f"[vq-train] step {step} rec {entry['rec_loss']:.4f} q {float(q_loss.detach()):.4f} "
                      f"usage {entry['usage']:.2f} restarts {restarts} {entry['seconds']:.0f}s", file=sys.stderr)
        if step % options.checkpoint_every == 0:
            checkpoint_now()
    seconds = elapsed()
    if step > start_step or checkpoint is None:
        checkpoint_now()

    model = ema.model if ema is not None else model
    model.eval()
    eval_images = heldout_images if len(heldout_images) else train_images[:8]
    metrics = evaluate(model, eval_images, options.eval_batch_size)
    write_reconstructions(model, eval_images[:8], out / "reconstructions.png")
    trained_seconds = seconds - elapsed_before
    report = {
        "heldout_psnr_db": metrics["psnr"],
        "heldout_ssim": metrics["ssim"],
        "heldout_codebook_usage": metrics["codebook_usage"],
        "train_codebook_usage": tracker.usage(step, options.usage_window),
        "heldout_images": int(len(heldout_images)),
        "train_images": int(len(train_images)),
        "steps": step,
        "steps_this_run": step - start_step,
        "resumed_from_step": start_step if checkpoint is not None else None,
        "seconds": round(seconds, 2),
        "images_per_second": round((step - start_step) * batch_size / max(trained_seconds, 1e-9), 3),
        "dead_code_restarts": restarts,
        "history": history,
        "settings": {"seconds_budget": seconds_budget, "heldout_fraction": heldout_fraction, "seed": seed,
                     "lpips_weights": str(lpips_weights) if lpips_weights else None, **asdict(options)},
        "config": config.to_dict(),
    }
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_reconstructions(model: VQGAN, images: torch.Tensor, path: Path) -> None:
    """A PNG grid: originals on the top row, their reconstructions below."""
    recon = to_uint8(model.decode(model.encode(to_float(images))).cpu())
    grid = torch.cat([torch.cat(list(images), dim=2), torch.cat(list(recon), dim=2)], dim=1)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
