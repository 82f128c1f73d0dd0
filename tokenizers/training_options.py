"""The options of the tokenizer trainers: the VQ-GAN's (``train_vqgan``) and the CLIP's (``train_clip``).

Plain dataclasses in a module that imports no torch: ``cm3 tokenizer train-vq`` and ``cm3 clip train`` take their
defaults from them when the command line starts, and the trainers read the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainOptions:
    """How ``train_vqgan`` trains: steps, batch, learning rate, taming's loss weights (the GAN starts late) and
    the schedule. ``demo_training_options`` holds the values tuned for the "demo" preset."""

    steps: int = 100_000  # optimizer steps (a time budget, ``seconds_budget``, may stop training first)
    batch_size: int = 4
    lr: float = 2e-4  # Adam, betas 0.5/0.9 as taming; higher rates collapsed the demo preset's codes
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
    num_threads: int | None = None  # torch CPU threads for the run; None leaves torch's (one per core)


def demo_training_options() -> TrainOptions:
    """Options for the "demo" preset: whole 256x256 images (a token is a fixed 32x32 cell, so crops would only
    shift the cell grid), batch 8, a peak learning rate of 1e-3 after a 200-step warm-up, one thread, as the
    demo trains its CLIP on the other core. Measurements: docs/demo.md."""
    return TrainOptions(batch_size=8, lr=1e-3, crop_size=None, usage_window=30, warmup_steps=200, num_threads=1)


@dataclass(frozen=True)
class ClipTrainOptions:
    """How ``train_clip`` trains a small OpenCLIP model from random init (contrastive loss, AdamW, cosine)."""

    model_name: str = "cm3-clip-tiny"  # any OpenCLIP config name, this project's small ones included
    steps: int = 450  # the cosine schedule runs over these steps or ``seconds_budget``, whichever ends first
    batch_size: int = 64  # image-text pairs per step
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.1
    warmup: float = 0.05  # share of training spent warming up
    # Share of each batch made of partners of other members whose captions differ in exactly one word
    # (0: plain random batches).
    hard_negatives: float = 0.0
    holdout_fraction: float = 0.1
    seed: int = 0
    torch_threads: int | None = None  # set for the run only; None leaves torch's (one per core)
