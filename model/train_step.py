"""One optimizer step of the decoder: AdamW and its schedule, the weighted CM3 loss, gradient accumulation.

No Ray and no data reading in here: `cm3.model.train_loop` calls `train_step` every step, and
`benchmarks/train.py` times the very same function.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cm3.core.schedule import warmup_then_decay
from cm3.model.config import CM3Config
from cm3.model.decoder import CM3
from cm3.model.train_data import Batch
from cm3.tokenizers.vocabulary import Vocabulary

# Optimizer and schedule


def build_optimizer(model: nn.Module, config: CM3Config) -> torch.optim.AdamW:
    """AdamW with the preset's betas and weight decay over the trainable parameters (no bias/norm exemptions).
    With only some head rows trainable (`train_image_head_only`) there is no weight decay: AdamW's decay would
    shrink the frozen rows of the same matrix."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_cuda for p in params)
    decay = 0.0 if getattr(model, "head_rows", None) is not None else config.weight_decay
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=decay, fused=fused or None)


TRAINABLE = ("all", "image-head")


def train_image_head_only(model: CM3, vocab: Vocabulary) -> None:
    """Freeze everything but the image-token rows of the (untied) output head, as Anole restored Chameleon's
    image generation: the other rows get no gradient (`CM3.head_rows`), so text logits stay exactly as they were."""
    if model.lm_head is None:
        raise ValueError("--trainable image-head needs an untied output head (tie_embeddings false, as in "
                         "Chameleon); this model shares it with the token embedding")
    for param in model.parameters():
        param.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    model.head_rows = torch.from_numpy(np.asarray(vocab.is_image(np.arange(model.config.vocab_size))))


def warmup_for(config: CM3Config, total_steps: int) -> int:
    """The preset's warm-up, but never more than a tenth of the run (a 50-step tiny run still decays)."""
    return max(1, min(config.warmup_steps, total_steps // 10))


def learning_rate(step: int, config: CM3Config, total_steps: int) -> float:
    """Linear warm-up to `lr`, then linear decay to `lr * min_lr_ratio` at `total_steps` (metaseq's schedule)."""
    return config.lr * warmup_then_decay(step, total_steps, warmup_for(config, total_steps), "linear",
                                         config.min_lr_ratio)


def grad_accumulation(batch_tokens: int, micro_batch: int, seq_len: int, world: int) -> int:
    """Micro-batches per step so that one step sees about `batch_tokens` tokens over all workers."""
    return max(1, round(batch_tokens / (micro_batch * seq_len * world)))


def total_steps_for(config: CM3Config, steps: int | None) -> int:
    """`steps` when given, else the preset's token budget in batches of `batch_tokens`."""
    return steps if steps is not None else max(1, math.ceil(config.train_tokens / config.batch_tokens))


# The step


@dataclass
class StepStats:
    loss: float
    text_loss: float
    image_loss: float
    grad_norm: float
    tokens: int  # window tokens processed by all workers (padding included)
    workers: int = 1  # ranks whose micro-batches the loss sums came from (the all-reduce's group size)


class TokenKinds:
    """Which targets are text and which are image codes: one lookup per id (any vocabulary, any device)."""

    def __init__(self, vocab: Vocabulary):
        self.text = torch.from_numpy(np.asarray(vocab.text_mask()))
        self.image = torch.from_numpy(np.asarray(vocab.is_image(np.arange(vocab.size))))

    def masks(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text.device != targets.device:
            self.text, self.image = self.text.to(targets.device), self.image.to(targets.device)
        return self.text[targets], self.image[targets]


def accumulate_gradients(model: nn.Module, micro_batches: list[Batch], kinds: TokenKinds,
                         autocast_dtype: torch.dtype | None = None,
                         sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
                         process_group: bool = False) -> torch.Tensor:
    """Forward and backward over the micro-batches, leaving in `.grad` the gradient of the weighted mean loss
    over every micro-batch of every rank (`cm3_loss`'s formula over all of them at once).

    Each rank scales its loss by world / (all ranks' loss weight): the ranks' gradients, averaged by DDP or
    FSDP, then equal the gradient of one batch holding all of them, and accumulation over micro-batches equals
    one big micro-batch. Returns this rank's sums [loss, weight, text loss, text weight, image loss, image weight].
    """
    device = micro_batches[0].inputs.device
    total = torch.stack([b.weights.sum() for b in micro_batches]).sum()
    world = 1
    if process_group:
        torch.distributed.all_reduce(total)
        world = torch.distributed.get_world_size()
    scale = world / total.clamp_min(1.0)
    sums = torch.zeros(6, device=device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with sync(last) if sync else contextlib.nullcontext():
            with _autocast(device, autocast_dtype):
                loss, ce = model(batch.inputs, targets=batch.targets, loss_weights=batch.weights * scale)
            loss.backward()
        with torch.no_grad():
            text, image = kinds.masks(batch.targets)
            w = batch.weights
            weighted = ce * w
            sums += torch.stack([weighted.sum(), w.sum(), (weighted * text).sum(), (w * text).sum(),
                                 (weighted * image).sum(), (w * image).sum()])
    return sums


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, lr: float, grad_clip: float) -> float:
    """Clip the gradient's global norm (over every rank's shard under FSDP), step AdamW at `lr`, clear the
    gradients; returns the norm before clipping."""
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[Batch], lr: float,
               grad_clip: float, kinds: TokenKinds, autocast_dtype: torch.dtype | None = None,
               sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
               process_group: bool = False) -> StepStats:
    """`accumulate_gradients`, then `optimizer_step`. The loss reported is the weighted mean over every
    micro-batch of every rank (not a mean of means), split by target kind."""
    sums = accumulate_gradients(model, micro_batches, kinds, autocast_dtype, sync, process_group)
    grad_norm = optimizer_step(model, optimizer, lr, grad_clip)
    world = 1
    if process_group:
        torch.distributed.all_reduce(sums)
        world = torch.distributed.get_world_size()
    loss, weight, text_loss, text_weight, image_loss, image_weight = sums.tolist()
    tokens = world * sum(b.inputs.numel() for b in micro_batches)
    return StepStats(loss / max(weight, 1.0), text_loss / max(text_weight, 1.0),
                     image_loss / max(image_weight, 1.0), grad_norm, tokens, world)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
