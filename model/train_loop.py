"""The training loop in plain PyTorch: restore or build the model, parallelize it, stream batches, step, log,
checkpoint. It composes the parts that live beside it (`train_data`, `parallelize`, `train_step`,
`train_checkpoint`, `train_metrics`) and knows nothing of Ray: a `Session` tells it its rank and device,
hands it the checkpoint to resume from and takes the checkpoints it reports.

`cm3.workflows.train` runs `train` in every Ray Train worker (a session backed by `ray.train`); `LocalSession`
serves one process, or each rank of a `torchrun` launch:

    torch.distributed.init_process_group()          # under torchrun; leave out for one process
    train(LoopConfig(**plan), LocalSession(run_dir))
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Protocol

import torch

from cm3.core.files import atomic_folder
from cm3.model.config import CM3Config
from cm3.model.decoder import CM3
from cm3.model.parallelize import ParallelOptions, parallelize
from cm3.model.sequences import SequenceConfig
from cm3.model.train_checkpoint import (CHECKPOINT_PREFIX, TrainState, checkpoint_name, gather_state,
                                        latest_checkpoint, load_train_checkpoint, restore_optimizer,
                                        save_train_checkpoint)
from cm3.model.train_data import BatchProducer, DataPosition, RankShards, ShardUnit, packed_windows
from cm3.model.train_metrics import (METRICS_FILE, PROFILE_DIR, DashboardGauges, MetricsLog, attention_backend,
                                     flops_per_token, peak_flops, peak_memory_gib, profiler)
from cm3.model.train_step import TokenKinds, build_optimizer, learning_rate, train_image_head_only, train_step
from cm3.tokenizers.vocabulary import vocabulary_from_dict

FAILED_ONCE = ".failed_once"  # the fail_at_step test hook's marker: a run folder fails once
PAUSED = ".paused"  # the pause_at_step test hook's marker: rank 0 waits here, once per run folder, until killed


@dataclass
class LoopConfig:
    """Everything a worker needs, as plain data (a Ray driver sends it as a dict)."""

    model: dict  # CM3Config fields
    vocab: dict  # the vocabulary's to_dict (cm3's or a converted Chameleon's)
    sequences: dict  # SequenceConfig fields
    units: list[dict]  # ShardUnit fields: the shards' units of reading
    columns: list[str]
    total_steps: int
    batch_size: int  # sequences per micro-batch per worker
    accumulation: int  # micro-batches per step
    run_dir: str
    run_name: str = "cm3"
    seed: int = 0
    init: Optional[str] = None  # a cm3 checkpoint to start from (no training checkpoint yet)
    parallelism: str = "fsdp"
    ac_every: int = 0
    compile: bool = False
    float8: bool = False
    trainable: str = "all"  # or "image-head" (train_image_head_only)
    threads: Optional[int] = None
    checkpoint_every: int = 100
    log_every: int = 10
    profile_steps: int = 0
    prefetch: int = 2
    fail_at_step: Optional[int] = None  # test hook: rank 0 exits at this step, once per run folder
    pause_at_step: Optional[int] = None  # test hook: rank 0 stops at this step until killed, once per run folder


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device
    node: str  # the machine this rank runs on

    def checkpoint(self) -> contextlib.AbstractContextManager[Optional[Path]]:
        """The newest committed checkpoint folder to resume from (None: a fresh run)."""

    def report(self, metrics: dict, checkpoint: Optional[Path], name: str) -> None:
        """Every rank calls it; rank 0 passes the checkpoint folder to commit under `name`."""

    def gauges(self) -> Optional[DashboardGauges]:
        """Dashboard gauges, if the session has a dashboard."""


class LocalSession:
    """One process, or one rank of a `torchrun` launch whose process group is initialised: checkpoints are
    committed into the run folder (`core.files.atomic_folder`) and the newest `keep` are kept."""

    def __init__(self, run_dir: Path, keep: int = 3, device: Optional[torch.device] = None):
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if initialised else 0
        self.world_size = dist.get_world_size() if initialised else 1
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = device or (torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu"))
        self.node = socket.gethostname()
        self.run_dir, self.keep = Path(run_dir), keep

    @contextlib.contextmanager
    def checkpoint(self):
        yield latest_checkpoint(self.run_dir)

    def report(self, metrics: dict, checkpoint: Optional[Path], name: str) -> None:
        if checkpoint is None:
            return
        with atomic_folder(self.run_dir / name) as staging:
            shutil.copytree(checkpoint, staging, dirs_exist_ok=True)
        for old in sorted(self.run_dir.glob(f"{CHECKPOINT_PREFIX}*"))[:-self.keep]:
            shutil.rmtree(old)

    def gauges(self) -> None:
        return None


def train(config: LoopConfig, session: Session) -> None:
    """Train `config.total_steps` steps, resuming from the session's checkpoint when it has one."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    rank, world, device = session.rank, session.world_size, session.device
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    vocab = vocabulary_from_dict(config.vocab)
    sequences = SequenceConfig(**config.sequences)
    run_dir = Path(config.run_dir)

    model, model_config, optimizer_state, state, resumed = _restore_or_build(config, session)
    start_step = state.step
    if config.trainable == "image-head":
        train_image_head_only(model, vocab)

    # the data path starts first: its first batches are ready by the time the model is
    shards = RankShards([ShardUnit(**u) for u in config.units], config.columns, config.seed, rank, world)
    windows = packed_windows(shards, vocab, sequences, DataPosition(**state.positions[rank]))
    producer = BatchProducer(windows, config.batch_size, config.accumulation, pin=device.type == "cuda",
                             prefetch=config.prefetch)
    try:
        options = ParallelOptions(config.parallelism, config.ac_every, config.compile, config.float8)
        parallel = parallelize(model.to(device), device, world, options)
        optimizer = build_optimizer(parallel.model, model_config)
        if optimizer_state is not None:
            restore_optimizer(parallel.model, optimizer, optimizer_state, parallel.fsdp)
        autocast = torch.bfloat16 if device.type == "cuda" else None
        run = RunInfo(model_config, sequences.seq_len, device, world, autocast,
                      _gather(session.node, world) if world > 1 else [session.node])
        log = MetricsLog(run_dir / METRICS_FILE, resume_after_step=start_step if resumed else None) \
            if rank == 0 else None
        gauges = session.gauges() if rank == 0 else None
        if rank == 0:
            print(f"{parallel.summary}, on {run.nodes} node(s); attention kernel: {run.attention}", flush=True)
            if resumed:
                print(f"resumed from step {start_step} ({state.tokens_seen} tokens seen)", flush=True)
        kinds = TokenKinds(vocab)
        with profiler(run_dir / PROFILE_DIR, rank, config.profile_steps, device) as profile_step:
            for step in range(start_step, config.total_steps):
                if config.fail_at_step == step and rank == 0 and not (run_dir / FAILED_ONCE).exists():
                    (run_dir / FAILED_ONCE).touch()
                    os._exit(1)  # the test hook: a worker process dying mid-run
                if config.pause_at_step == step and rank == 0 and not (run_dir / PAUSED).exists():
                    (run_dir / PAUSED).touch()  # the test hook: a run to kill at a known step
                    threading.Event().wait()
                started = time.perf_counter()
                data = producer.next(device)
                lr = learning_rate(step, model_config, config.total_steps)
                stats = train_step(parallel.forward, optimizer, data.micro_batches, lr, model_config.grad_clip,
                                   kinds, autocast, parallel.sync, process_group=world > 1)
                seconds = time.perf_counter() - started
                profile_step()
                state.step, state.tokens_seen = step + 1, state.tokens_seen + stats.tokens
                record = {"step": step + 1, "loss": stats.loss, "text_loss": stats.text_loss,
                          "image_loss": stats.image_loss, "lr": lr, "grad_norm": stats.grad_norm,
                          **run.throughput(stats.tokens, seconds, _largest(data.wait_seconds / seconds, world,
                                                                           device)),
                          "tokens_seen": state.tokens_seen, "epoch": data.position.epoch,
                          "start_step": start_step, "world_size": stats.workers, "nodes": run.nodes,
                          "threads": torch.get_num_threads(), "attention": run.attention, "time": time.time()}
                if rank == 0:
                    log.write(record)
                    if gauges is not None:
                        gauges.set(record)
                    if (step + 1) % config.log_every == 0 or step + 1 == config.total_steps or step == start_step:
                        print(progress_line(record, config.total_steps), flush=True)
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.total_steps:
                    state.positions = _gather(asdict(data.position), world) if world > 1 else [asdict(data.position)]
                    _report_checkpoint(session, parallel.model, optimizer, model_config, state, record, rank)
        if log is not None:
            log.close()
    finally:
        producer.close()


def _restore_or_build(config: LoopConfig,
                      session: Session) -> tuple[CM3, CM3Config, Optional[dict], TrainState, bool]:
    """(model on the CPU, its training config, optimizer state or None, train state, resumed?): the session's
    checkpoint, or a new model (from `config.init`, else initialised with the seed, the same on every rank)
    trained with `config.model`'s schedule."""
    world = session.world_size
    with session.checkpoint() as directory:
        if directory is not None:
            model, optimizer_state, state = load_train_checkpoint(directory)
            if len(state.positions) != world:
                print(f"warning: the checkpoint was written by {len(state.positions)} worker(s), this run has "
                      f"{world}; the data pass restarts from the beginning of its epoch", flush=True)
                epoch = min(p["epoch"] for p in state.positions)
                state.positions = [asdict(DataPosition(epoch, 0))] * world
            return model, model.config, optimizer_state, state, True
    model_config = CM3Config.from_dict(config.model)
    torch.manual_seed(config.seed)
    model = CM3.from_pretrained(config.init) if config.init else CM3(model_config)
    state = TrainState(step=0, tokens_seen=0, positions=[asdict(DataPosition())] * world, seed=config.seed,
                       config=model_config.to_dict())
    return model, model_config, None, state, False


class RunInfo:
    """What the per-step figures of a run are computed from."""

    def __init__(self, config: CM3Config, seq_len: int, device: torch.device, world: int,
                 dtype: Optional[torch.dtype], nodes: list[str]):
        self.device, self.world = device, world
        self.flops = flops_per_token(config, seq_len)
        self.peak = peak_flops(device)
        self.attention = attention_backend(config, device, dtype or torch.float32)
        self.nodes = len(set(nodes))

    def throughput(self, tokens: int, seconds: float, data_wait: float) -> dict:
        tokens_per_s = tokens / seconds
        mfu = self.flops * tokens_per_s / (self.peak * self.world) if self.peak else None
        return {"tokens_per_s": tokens_per_s, "mfu": mfu, "data_wait": data_wait,
                "memory_gib": peak_memory_gib(self.device)}


def progress_line(record: dict, total_steps: int) -> str:
    mfu = f" MFU {record['mfu']:.1%}" if record.get("mfu") is not None else ""
    return (f"step {record['step']}/{total_steps} loss {record['loss']:.4f} (text {record['text_loss']:.4f}, "
            f"image {record['image_loss']:.4f}) lr {record['lr']:.2e} grad {record['grad_norm']:.2f} "
            f"{record['tokens_per_s']:,.0f} tok/s{mfu} data wait {record['data_wait']:.1%} "
            f"mem {record['memory_gib']:.2f} GiB")


def _report_checkpoint(session: Session, model, optimizer, config: CM3Config, state: TrainState, metrics: dict,
                       rank: int) -> None:
    """Every rank gathers (FSDP all-gathers the shards); rank 0 writes the folder and the session commits it."""
    weights, optimizer_state = gather_state(model, optimizer)
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    name = checkpoint_name(state.step)
    if rank != 0:
        session.report(metrics, None, name)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_train_checkpoint(Path(directory), weights, optimizer_state, config, state)
        session.report(metrics, Path(directory), name)


def _gather(value, world: int) -> list:
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _largest(value: float, world: int, device: torch.device) -> float:
    """The largest of every rank's `value` (a slow rank's data wait stalls all of them)."""
    if world == 1:
        return value
    tensor = torch.tensor([value], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor)
