"""Train the VQ-GAN tokenizer on raw ingest shards with plain PyTorch: the loop and the pieces only it uses.

Taming's recipe (reconstruction + codebook loss, optional LPIPS, PatchGAN with hinge loss and an
adaptive weight after ``disc_start``: ``vq_losses``) plus dead-code restarts, a wall-clock budget and a warm-up
then cosine learning rate (``cm3.core.schedule``), atomic checkpoints with resume, and a held-out report (PSNR,
SSIM, codebook usage, reconstructions.png: ``vq_metrics``) on images read by ``vq_data``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cm3.core.files import atomic_folder, recover_folder, write_json
from cm3.core.schedule import StepBudget, decay, warmup
from cm3.tokenizers.vq_data import is_heldout, load_images, random_batch
from cm3.tokenizers.vq_losses import LPIPS, PatchDiscriminator, adaptive_weight, hinge_d_loss
from cm3.tokenizers.vq_metrics import evaluate, write_reconstructions
from cm3.tokenizers.vqgan import VQGAN, VQGANConfig

CHECKPOINT_DIR = "checkpoint"
STATE_TENSORS = "training_state.pt"
STATE_JSON = "training_state.json"


@dataclass
class TrainOptions:
    """Loss weights and schedule knobs (taming's losses; the GAN starts late). ``demo_training_options``
    holds the values tuned for the "demo" preset."""

    l1_weight: float = 1.0
    l2_weight: float = 1.0
    codebook_weight: float = 1.0
    perceptual_weight: float = 1.0  # only used when lpips_weights is given
    disc_start: int = 10_000_000  # the GAN does not pay off within a few CPU minutes
    disc_weight: float = 0.8
    disc_lr_scale: float = 1.0
    disc_channels: int = 64
    disc_layers: int = 3
    dead_code_steps: int = 200  # a code unused this many steps is re-initialised
    restart_every: int = 100
    usage_window: int = 50  # steps over which training codebook usage is measured
    crop_size: int | None = 128  # random square crops: 4x cheaper steps than 256; None = full images
    # Draw this many candidate crops per image and keep the busiest (largest pixel variance): on images
    # that are mostly flat (the demo's shapes, product photos) plain random crops are mostly background.
    crop_candidates: int = 1
    # This share of each batch is cropped at a plain random position instead: the busiest crops hardly ever
    # show flat background far from a shape, which a whole image then decodes with ghost patches.
    plain_crop_share: float = 0.0
    warmup_steps: int = 5
    # Exponential moving average of the weights (decay per step, warmed up as min(decay, (1 + t) / (10 + t))):
    # the checkpoint and the report then hold the averaged weights, the training state the raw ones. None = off.
    ema_decay: float | None = None
    min_lr_fraction: float = 0.05  # cosine decay, over max(step, time) progress, down to this
    checkpoint_every: int = 200
    log_every: int = 25
    eval_batch_size: int = 16
    num_threads: int | None = 1  # on a shared 2-core box one thread ran 3x faster than two; None = leave as is


def demo_training_options() -> TrainOptions:
    """Options for the "demo" preset: whole 256x256 images (a token is a fixed 32x32 cell, so crops would only
    shift the cell grid), the learning rate warmed up over 200 steps. Measurements: docs/demo.md."""
    return TrainOptions(crop_size=None, usage_window=30, warmup_steps=200)


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
    """Write a complete checkpoint folder at once (``atomic_folder``), so a crash leaves one whole copy."""
    with atomic_folder(out_dir / CHECKPOINT_DIR) as staging:
        model.save_pretrained(staging)
        torch.save(state, staging / STATE_TENSORS)
        (staging / STATE_JSON).write_text(json.dumps(info, indent=2) + "\n")


def find_checkpoint(out_dir: Path) -> Path | None:
    """The complete checkpoint in ``out_dir``, if any (after undoing what a killed save left)."""
    recover_folder(out_dir / CHECKPOINT_DIR)
    candidate = out_dir / CHECKPOINT_DIR
    return candidate if (candidate / STATE_JSON).is_file() else None


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
    """Linear warm-up over ``warmup_steps`` times a cosine decay to ``min_lr_fraction`` over the budget's progress."""
    return warmup(step, max(1, options.warmup_steps)) * decay(progress, "cosine", options.min_lr_fraction)


def train_vqgan(
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: VQGANConfig,
    *,
    steps: int = 100_000,
    batch_size: int = 4,
    lr: float = 2e-4,  # 1e-3 and 5e-4 diverged/collapsed on the demo preset; 2e-4 did not
    seconds_budget: float | None = None,
    heldout_fraction: float = 0.05,
    seed: int = 0,
    lpips_weights: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = True,
    options: TrainOptions | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Train until ``steps`` or ``seconds_budget`` (training wall clock), checkpoint, evaluate, report.

    On ``device="cuda"`` the models train there in float32 (the images stay in CPU memory as uint8 and each
    batch is drawn there with the same generator, so a seed gives the same batches on any device)."""
    options = options or TrainOptions()
    device = torch.device(device)
    previous_threads = torch.get_num_threads()
    if options.num_threads:
        torch.set_num_threads(options.num_threads)
    try:
        return _train(data, Path(out_dir), config, steps, batch_size, lr, seconds_budget, heldout_fraction, seed,
                      lpips_weights, resume, progress, options, device)
    finally:
        torch.set_num_threads(previous_threads)


def _train(data: str | os.PathLike[str], out: Path, config: VQGANConfig, steps: int, batch_size: int, lr: float,
           seconds_budget: float | None, heldout_fraction: float, seed: int,
           lpips_weights: str | os.PathLike[str] | None, resume: bool, progress: bool,
           options: TrainOptions, device: torch.device) -> dict[str, Any]:
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
                        {"step": step, "seconds": budget.elapsed(), "config": config.to_dict()})

    model.train()
    disc.train()
    has_codebook = not config.fsq_levels  # FSQ has no codes to restart
    history: list[dict[str, float]] = []
    window: list[float] = []
    restarts = 0
    budget = StepBudget(steps, seconds_budget, elapsed_before)
    while (progress_fraction := budget.progress(step)) < 1.0:
        for group, base in ((opt.param_groups[0], lr), (disc_opt.param_groups[0], lr * options.disc_lr_scale)):
            group["lr"] = base * _lr_factor(step, progress_fraction, options)
        x = random_batch(train_images, batch_size, options.crop_size, generator, options.crop_candidates,
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
            entry = {"step": step, "rec_loss": sum(window) / len(window), "seconds": round(budget.elapsed(), 1),
                     "usage": tracker.usage(step, options.usage_window)}
            history.append(entry)
            window.clear()
            if progress:
                print(f"[vq-train] step {step} rec {entry['rec_loss']:.4f} q {float(q_loss.detach()):.4f} "
                      f"usage {entry['usage']:.2f} restarts {restarts} {entry['seconds']:.0f}s", file=sys.stderr)
        if step % options.checkpoint_every == 0:
            checkpoint_now()
    seconds = budget.elapsed()
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
        "settings": {"steps": steps, "batch_size": batch_size, "lr": lr, "seconds_budget": seconds_budget,
                     "heldout_fraction": heldout_fraction, "seed": seed,
                     "lpips_weights": str(lpips_weights) if lpips_weights else None, **asdict(options)},
        "config": config.to_dict(),
    }
    write_json(out / "report.json", report)
    return report
