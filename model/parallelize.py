"""How the decoder is spread over workers and made cheaper, applied per block in torchtitan's order:
float8 linears, activation checkpointing, compile, then FSDP2 (or DDP).

- `apply_float8`: torchao's float8 training for the blocks' linear layers (dynamic tensorwise scaling).
- `apply_ac`: recompute every N-th block in the backward pass (1: every block, torchtitan's "full").
- `apply_compile`: `torch.compile` each block on its own (identical blocks share one compiled graph), after
  AC so that the recomputation is compiled too, and before FSDP; and the loss's per-chunk kernel.
- `apply_fsdp`: FSDP2 `fully_shard` on each block, then on the root (embeddings, final norm, tied head); on a
  GPU with bf16 parameters for compute and fp32 gradient reduction. Works on CPU workers over gloo too.
- `apply_ddp`: the whole model replicated, gradients all-reduced.

Every wrapper keeps the state-dict keys of the plain module, so checkpoints do not depend on the parallelism.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

PARALLELISMS = ("fsdp", "ddp", "none")


@dataclass(frozen=True)
class ParallelOptions:
    parallelism: str = "fsdp"  # with one worker every choice trains the plain module; "none" only with one
    ac_every: int = 0  # recompute every N-th block in backward; 0: none, 1: all ("full")
    compile: bool = False
    float8: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.parallelism not in PARALLELISMS:
            raise ValueError(f"parallelism must be one of {PARALLELISMS}, got {self.parallelism!r}")
        if self.ac_every < 0:
            raise ValueError(f"activation checkpointing every N blocks needs N >= 0, got {self.ac_every}")


@dataclass
class Parallelized:
    model: nn.Module  # parameters, state dicts and the optimizer come from here
    forward: nn.Module  # what the step calls: `model` itself, or its DDP wrapper
    sync: Callable[[bool], contextlib.AbstractContextManager] | None  # gradient sync on the last micro-batch only
    fsdp: bool
    summary: str  # e.g. "fsdp over 2 workers, activation checkpointing every 2nd block, compiled per block"


def parallelize(model: nn.Module, device: torch.device, world: int, options: ParallelOptions) -> Parallelized:
    """Apply `options` to `model` (already on `device`) in torchtitan's order."""
    if world > 1 and options.parallelism == "none":
        raise ValueError(f"parallelism 'none' trains one worker, not {world}: use fsdp or ddp")
    parts = []
    if options.float8:
        apply_float8(model)
        parts.append("float8 linears")
    if options.ac_every:
        apply_ac(model, options.ac_every)
        parts.append("activation checkpointing " + ("every block" if options.ac_every == 1
                                                    else f"every {_ordinal(options.ac_every)} block"))
    if options.compile:
        apply_compile(model, options.compile_backend)
        parts.append("compiled per block")
    forward, sync, fsdp = model, None, False
    if world > 1 and options.parallelism == "fsdp":
        apply_fsdp(model, device)
        fsdp = True

        def sync(last: bool) -> contextlib.AbstractContextManager:
            model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
    elif world > 1 and options.parallelism == "ddp":
        forward = apply_ddp(model, device)

        def sync(last: bool) -> contextlib.AbstractContextManager:
            return contextlib.nullcontext() if last else forward.no_sync()
    summary = ", ".join([f"{options.parallelism} over {world} workers" if world > 1 else "1 worker", *parts])
    return Parallelized(model, forward, sync, fsdp, summary)


def apply_float8(model: nn.Module) -> None:
    """Swap the blocks' `nn.Linear`s for torchao's `Float8Linear` (matmuls in float8 with dynamic scales,
    weights and gradients kept in high precision). Needs `pip install 'cm3[float8]'`; pays off on H100-class
    GPUs for the wide layers of the 760m and 7b presets."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as err:
        raise ValueError("--float8 needs torchao: pip install 'cm3[float8]'") from err

    def eligible(module: nn.Module, fqn: str) -> bool:  # float8 matmuls need both dimensions divisible by 16
        return fqn.startswith("blocks.") and module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(model, module_filter_fn=eligible)


def apply_ac(model: nn.Module, every: int) -> None:
    """Wrap blocks 0, N, 2N, ... so that their activations are recomputed in backward instead of kept."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for index, block in enumerate(model.blocks):
        if index % every == 0:
            model.blocks[index] = checkpoint_wrapper(block, preserve_rng_state=False)  # blocks draw no random numbers


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """Compile each block in place (`Module.compile`: parameter names unchanged), whole-graph; and, as
    torchtitan compiles its loss, the loss's per-chunk kernel (its softmax and gradient passes fuse)."""
    from cm3.model.loss import cross_entropy_and_gradient

    for block in model.blocks:
        block.compile(backend=backend, fullgraph=True)
    model.loss_kernel = torch.compile(cross_entropy_and_gradient, backend=backend, fullgraph=True, dynamic=False)


def apply_fsdp(model: nn.Module, device: torch.device) -> None:
    """FSDP2 per block, then the root. The last block keeps its parameters gathered after forward: backward
    needs them at once. Forward inputs are not cast to bf16: the RoPE angles and the loss weights stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32} if device.type == "cuda" else {}
    policy = MixedPrecisionPolicy(cast_forward_inputs=False, **bf16)
    last = len(model.blocks) - 1
    for index, block in enumerate(model.blocks):
        fully_shard(block, mp_policy=policy, reshard_after_forward=index < last)
    fully_shard(model, mp_policy=policy)


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
