"""`cm3 train`: the typer command. Its defaults are `TrainOptions`' (a test holds them equal)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from cm3.workflows.commands.common import fail
from cm3.workflows.train import TrainOptions

D = TrainOptions(stage="", shards=Path())  # only its defaults are read


def parse_overrides(values: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs; VALUE is read as JSON when it parses (numbers, booleans), else as a string."""
    overrides = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set n_layers=2")
        try:
            overrides[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key.strip()] = text
    return overrides


def train_command(
    stage: str = typer.Option(..., help="pretrain (retrieval-augmented shards) or sft (instruction tuning)."),
    shards: Path = typer.Option(..., help="Shard folder: cm3 build-index output (pretrain) or SFT task shards."),
    tokenizer: Optional[Path] = typer.Option(D.tokenizer, help="Tokenizer folder (default: the one in --init)."),
    init: Optional[Path] = typer.Option(D.init, help="Start from this cm3 checkpoint or pretrain run folder (sft: required)."),
    storage: Path = typer.Option(D.storage, help="Folder for run folders (checkpoints, metrics); every node must see it."),
    name: Optional[str] = typer.Option(D.name, help="Run name (default: cm3-STAGE); the same name resumes."),
    out: Optional[Path] = typer.Option(D.out, help="Inference checkpoint to export (default: STORAGE/NAME/final)."),
    preset: str = typer.Option(D.preset, help="Model preset: tiny, 350m, 760m, 7b (ignored with --init)."),
    set_: list[str] = typer.Option([], "--set", help="Override a model config field, e.g. --set n_layers=2."),
    seq_len: Optional[int] = typer.Option(D.seq_len, min=8, help="Tokens per training window (default: max_seq_len)."),
    batch_size: int = typer.Option(D.batch_size, min=1, help="Sequences per micro-batch per worker."),
    batch_tokens: Optional[int] = typer.Option(D.batch_tokens, min=1, help="Tokens per optimizer step (default: preset's)."),
    steps: Optional[int] = typer.Option(D.steps, min=1, help="Optimizer steps (default: preset's tokens / batch)."),
    lr: Optional[float] = typer.Option(D.lr, min=0.0, help="Peak learning rate (default: preset's)."),
    warmup_steps: Optional[int] = typer.Option(D.warmup_steps, min=0, help="Warm-up steps (capped at 10% of the run)."),
    retrieved_min: int = typer.Option(D.retrieved_min, min=0, help="Fewest retrieved documents per example."),
    retrieved_max: int = typer.Option(D.retrieved_max, min=0, help="Most retrieved documents per example."),
    image_first: float = typer.Option(D.image_first, min=0.0, max=1.0,
                                      help="Share of main documents laid out image first (captioning order)."),
    cm3: bool = typer.Option(D.cm3, help="CM3 span objective (--no-cm3: plain causal LM)."),
    seed: int = typer.Option(D.seed, help="Initialisation and data-order seed."),
    num_workers: int = typer.Option(D.num_workers, min=1, help="Ray Train workers (one GPU each when the cluster has GPUs)."),
    cpus_per_worker: float = typer.Option(D.cpus_per_worker, min=0.01, help="CPUs each worker holds (fractions allowed)."),
    threads_per_worker: Optional[int] = typer.Option(D.threads_per_worker, min=1, help="torch threads per worker (default: one per CPU)."),
    gpu: Optional[bool] = typer.Option(D.use_gpu, "--gpu/--cpu", help="Force GPU or CPU workers (default: GPU if any)."),
    parallelism: str = typer.Option(D.parallelism, help="fsdp (FSDP2: parameters sharded over the workers), ddp "
                                                        "(replicated), or none."),
    activation_checkpointing: str = typer.Option(D.activation_checkpointing, help="Recompute blocks in backward: "
                                                 "none, full, or N (every N-th block)."),
    compile_model: bool = typer.Option(D.compile, "--compile", help="torch.compile each block."),
    float8: bool = typer.Option(D.float8, "--float8", help="float8 matmuls in the blocks (torchao; H100-class GPUs, "
                                                           "760m and larger)."),
    trainable: str = typer.Option(D.trainable, help="all, or image-head: only the output head's image-token rows "
                                                    "(Anole's recipe for Chameleon; needs an untied head)."),
    profile: int = typer.Option(D.profile, min=0, help="Trace this many steps with the torch profiler "
                                                       "(STORAGE/NAME/profile/rankR.json)."),
    prefetch: int = typer.Option(D.prefetch, min=1, help="Steps of batches the background producer keeps ready."),
    checkpoint_every: int = typer.Option(D.checkpoint_every, min=1, help="Steps between checkpoints."),
    keep: int = typer.Option(D.keep, min=1, help="Checkpoints kept."),
    max_failures: int = typer.Option(D.max_failures, min=-1, help="Worker failures survived (-1: no limit)."),
    log_every: int = typer.Option(D.log_every, min=1, help="Steps between progress lines."),
    ray_address: Optional[str] = typer.Option(D.ray_address, help="Ray cluster to join; default: start a local one."),
) -> None:
    """Train the decoder on Ray: pretrain on retrieval-augmented shards, or instruction-tune (sft).

    Re-running the same command resumes from the run's last checkpoint.

    Examples:

      cm3 train --stage pretrain --shards data/augmented --tokenizer tokenizer/ --steps 2000

      cm3 train --stage pretrain --shards data/augmented --tokenizer tokenizer/ --preset 350m --num-workers 8
      --parallelism fsdp --activation-checkpointing 2 --compile --ray-address HEAD:6379

      cm3 train --stage sft --shards data/sft --init runs/train/cm3-pretrain --steps 500 --lr 1e-4

      cm3 train --stage sft --shards data/sft-chameleon --init ckpt/chameleon-7b --no-cm3 --trainable image-head
      --activation-checkpointing full --num-workers 8 --batch-size 1 --steps 1000 --lr 2e-4
    """
    from cm3.workflows.train import run_training

    try:
        options = TrainOptions(
            stage=stage, shards=shards, storage=storage, name=name, tokenizer=tokenizer, init=init, out=out,
            preset=preset, model_overrides=parse_overrides(set_), seq_len=seq_len, batch_size=batch_size,
            batch_tokens=batch_tokens, steps=steps, lr=lr, warmup_steps=warmup_steps, retrieved_min=retrieved_min,
            retrieved_max=retrieved_max, image_first=image_first, cm3=cm3, seed=seed, num_workers=num_workers,
            cpus_per_worker=cpus_per_worker, threads_per_worker=threads_per_worker, use_gpu=gpu,
            parallelism=parallelism, activation_checkpointing=activation_checkpointing, compile=compile_model,
            float8=float8, trainable=trainable, profile=profile, prefetch=prefetch, checkpoint_every=checkpoint_every, keep=keep,
            max_failures=max_failures, log_every=log_every, ray_address=ray_address,
        )
        run_training(options)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))


# CLI parameter name -> TrainOptions field, where they differ (the test of the defaults reads it)
OPTION_FIELDS = {"set_": "model_overrides", "gpu": "use_gpu", "compile_model": "compile"}
