"""Training components the loop composes: data windows, optimizer and schedule, the train step, checkpoints.

No Ray in here: `cm3.workflows.train` runs these inside Ray Train workers, and `benchmarks/train.py` times
the very same `train_step`.

Data order is a pure function of (seed, epoch, row index): every row's CM3 transform draws from its own
`default_rng([seed, epoch, row])`, and packing restarts at a row boundary, so a run resumed from
`DataPosition(epoch, row)` produces exactly the windows the uninterrupted run would have produced.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cm3.model.config import CM3Config, num_parameters
from cm3.model.decoder import CM3
from cm3.model.objective import cm3_transform
from cm3.model.sequences import Packed, SequenceConfig, pack, transformed_example
from cm3.tokenizers.vocabulary import Vocabulary

STATE_FILE = "train_state.json"  # written last: a checkpoint folder without it is incomplete
OPTIMIZER_FILE = "optimizer.pt"

# Dense bf16 tensor-core peak FLOP/s by device-name substring (no sparsity), for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12,
                   "A10G": 125e12, "L4": 121e12}


# Data


@dataclass(frozen=True)
class DataPosition:
    """Where the next window starts: global row `row` of pass `epoch` over the shards."""

    epoch: int = 0
    row: int = 0


def row_example(row: dict, vocab: Vocabulary, config: SequenceConfig,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(ids, weights) for one row: an SFT row's laid-out `ids` as they are, a document row via `example_ids`
    (retrieved documents first); then the CM3 transform, cut to one window."""
    ids = row.get("ids")
    if ids is None:
        return transformed_example(row, vocab, config, rng)
    if config.cm3:
        transformed = cm3_transform(ids, vocab, rng, config.seq_len + 1, poisson_lambda=config.poisson_lambda)
        return transformed.ids, transformed.loss_weights
    ids = np.asarray(ids[: config.seq_len + 1], dtype=np.int64)
    return ids, np.ones(len(ids) - 1, dtype=np.float32)


def packed_windows(rows_of_epoch: Callable[[int], Iterable[dict]], vocab: Vocabulary, config: SequenceConfig,
                   seed: int, start: DataPosition = DataPosition(), rank: int = 0,
                   world: int = 1) -> Iterator[tuple[Packed, DataPosition]]:
    """Endless packed windows over the rows this rank owns (row % world == rank), each with the position
    the next window starts at: checkpoint that position and resuming from it continues the same stream."""
    epoch, first = start.epoch, start.row
    while True:
        next_row = [first]

        def examples() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for index, row in enumerate(rows_of_epoch(epoch)):
                if index >= first and index % world == rank:
                    next_row[0] = index  # pack() yields a window when this example does not fit: it starts the next
                    yield row_example(row, vocab, config, np.random.default_rng([seed, epoch, index]))
            next_row[0] = -1

        produced = False
        for window in pack(examples(), config.seq_len, vocab.pad):
            produced = True
            yield window, DataPosition(epoch + 1, 0) if next_row[0] < 0 else DataPosition(epoch, next_row[0])
        if not produced and first == 0:
            raise ValueError(f"worker {rank} of {world} got no rows: the shards hold fewer rows than workers")
        epoch, first = epoch + 1, 0


@dataclass
class Batch:
    inputs: torch.Tensor  # int64 [B, T]
    targets: torch.Tensor  # int64 [B, T]
    weights: torch.Tensor  # float32 [B, T]

    @classmethod
    def stack(cls, windows: list[Packed], device: torch.device | str = "cpu") -> Batch:
        def tensor(name: str) -> torch.Tensor:
            return torch.from_numpy(np.stack([getattr(w, name) for w in windows])).to(device, non_blocking=True)

        return cls(tensor("inputs"), tensor("targets"), tensor("weights"))


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


def train_image_head_only(model: CM3, vocab) -> None:
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
    warmup = warmup_for(config, total_steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return config.lr * (1.0 - (1.0 - config.min_lr_ratio) * progress)


def grad_accumulation(batch_tokens: int, micro_batch: int, seq_len: int, world: int) -> int:
    """Micro-batches per step so that one step sees about `batch_tokens` tokens over all workers."""
    return max(1, round(batch_tokens / (micro_batch * seq_len * world)))


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


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[Batch], lr: float,
               grad_clip: float, kinds: TokenKinds, autocast_dtype: torch.dtype | None = None,
               sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
               process_group: bool = False) -> StepStats:
    """Forward, weighted CM3 loss (`cm3_loss`'s formula, also split by target kind), backward over the
    micro-batches, clip, AdamW step. The step's loss is the weighted mean over every micro-batch (not the
    mean of micro-batch means), so accumulation gives the gradient one big batch would."""
    total_weight = sum(float(b.weights.sum()) for b in micro_batches)
    sums = torch.zeros(6, device=micro_batches[0].inputs.device)  # loss, weight, text loss/weight, image loss/weight
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with (sync(last) if sync else contextlib.nullcontext()), _autocast(batch.inputs.device, autocast_dtype):
            logits = model(batch.inputs)
            ce = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), reduction="none")
            weighted = ce * batch.weights.flatten()
            (weighted.sum() / max(total_weight, 1.0)).backward()
        with torch.no_grad():
            text, image = (m.flatten() for m in kinds.masks(batch.targets))
            w = batch.weights.flatten()
            sums += torch.stack([weighted.sum(), w.sum(), (weighted * text).sum(), (w * text).sum(),
                                 (weighted * image).sum(), (w * image).sum()]).detach()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    world = 1
    if process_group:
        torch.distributed.all_reduce(sums)
        world = torch.distributed.get_world_size()
    loss, weight, text_loss, text_weight, image_loss, image_weight = sums.tolist()
    tokens = world * sum(b.inputs.numel() for b in micro_batches)
    return StepStats(loss / max(weight, 1.0), text_loss / max(text_weight, 1.0),
                     image_loss / max(image_weight, 1.0), float(grad_norm), tokens, world)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one device, from `PEAK_BF16_FLOPS`; None on CPU or an unknown card."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(config: CM3Config, seq_len: int) -> float:
    """6 N over the matmul parameters (blocks and the tied output head) + attention's 6 L T d (PaLM's MFU)."""
    n = num_parameters(config, include_embeddings=False) + config.vocab_size * config.d_model
    return 6 * n + 6 * config.n_layers * seq_len * config.d_model


# Checkpoints


@dataclass
class TrainState:
    """Everything besides weights and optimizer moments that a resumed run needs to continue identically."""

    step: int
    tokens_seen: int
    positions: list[dict]  # one DataPosition per worker rank
    seed: int
    config: dict

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, directory: Path) -> TrainState:
        return cls(**json.loads((Path(directory) / STATE_FILE).read_text()))


def save_train_checkpoint(directory: Path, model_state: dict[str, torch.Tensor], optimizer_state: dict,
                          config: CM3Config, state: TrainState) -> None:
    """Weights as safetensors + config.json (a `CM3.from_pretrained` folder), optimizer state as tensors,
    then train_state.json last. Ray then copies the folder to storage and commits it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = _model_on_meta(config)
    model.load_state_dict(model_state, assign=True)
    model.save_pretrained(directory)
    torch.save(optimizer_state, directory / OPTIMIZER_FILE)
    tmp = directory / f".{STATE_FILE}.tmp-{os.getpid()}"
    tmp.write_text(state.to_json())
    os.replace(tmp, directory / STATE_FILE)


def load_train_checkpoint(directory: Path) -> tuple[CM3, dict, TrainState]:
    """(model on CPU, optimizer state dict, train state); nothing is unpickled (`weights_only=True`)."""
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        raise FileNotFoundError(f"{directory}: not a complete training checkpoint ({STATE_FILE} is missing)")
    model = CM3.from_pretrained(directory)
    optimizer_state = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    return model, optimizer_state, TrainState.read(directory)


def _model_on_meta(config: CM3Config) -> CM3:
    with torch.device("meta"):
        return CM3(config)


def total_steps_for(config: CM3Config, steps: int | None) -> int:
    """`steps` when given, else the preset's token budget in batches of `batch_tokens`."""
    return steps if steps is not None else max(1, math.ceil(config.train_tokens / config.batch_tokens))
