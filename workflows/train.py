"""`cm3 train`: pretrain (retrieval-augmented shards) or instruction-tune the decoder on Ray Train.

The driver checks every input before anything starts (clear errors, no checkpoint touched), reads the
shards with Ray Data and hands them to a `TorchTrainer`. Each worker turns rows into CM3 windows itself
(`cm3.model.training.packed_windows`), trains, and reports a checkpoint every `checkpoint_every` steps:

    STORAGE/NAME/checkpoint_0000100/   weights (safetensors) + optimizer.pt + train_state.json (Ray keeps N)
    STORAGE/NAME/metrics.jsonl         one line per step: loss (text/image), lr, grad norm, tokens/s, MFU
    STORAGE/NAME/loss_curve.png        drawn at the end
    STORAGE/NAME/final/                the cm3 inference checkpoint (`cm3 generate --checkpoint`)

Running the same command again (same --storage and --name) resumes from the last checkpoint with the same
data order; a worker that dies is restarted from it by Ray (`--max-failures`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer

STAGES = ("pretrain", "sft")
DOCUMENT_COLUMNS = ("text_ids", "image_ids")
NEIGHBOUR_COLUMNS = ("neighbour_text_ids", "neighbour_image_ids")
SFT_COLUMN = "ids"
FINAL_DIR = "final"
LOSS_CURVE = "loss_curve.png"
FAIL_AT_STEP_ENV = "CM3_TRAIN_FAIL_AT_STEP"  # test hook: rank 0 exits at this step, once per run folder
# Every worker runs its own Ray Data read of the shards (see DataConfig below). Each read runs one task at a
# time on this many CPUs, and the CPUs the train workers leave free must fit all of them at once: a worker
# that has its windows waits in the step's all-reduce while its read task, paused by backpressure, still
# holds a CPU; if that was the last free CPU, the other worker's read never starts and neither reaches step 1.
READ_CPUS_PER_WORKER = 0.25


@dataclass
class TrainOptions:
    stage: str
    shards: Path
    storage: Path = Path("runs/train")
    name: Optional[str] = None  # default: cm3-<stage>
    tokenizer: Optional[Path] = None  # pretrain: required unless --init; sft: taken from --init
    init: Optional[Path] = None  # a cm3 inference checkpoint, or a training run folder holding final/
    out: Optional[Path] = None  # default: STORAGE/NAME/final
    preset: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # CM3Config fields (new models only)
    seq_len: Optional[int] = None  # default: the model's max_seq_len
    batch_size: int = 8  # sequences per micro-batch per worker
    batch_tokens: Optional[int] = None  # tokens per optimizer step over all workers (default: the preset's)
    steps: Optional[int] = None  # default: the preset's train_tokens / batch_tokens
    lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    retrieved_min: int = 2
    retrieved_max: int = 2
    image_first: float = 0.5
    cm3: bool = True
    seed: int = 0
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    # torch threads per worker; None leaves Ray's default (one per whole CPU the worker holds). Ray only hands out
    # whole CPUs above one, so a worker that should use both cores of a 2-core box while Ray Data reads holds 1 CPU
    # and asks for 2 threads here.
    threads_per_worker: Optional[int] = None
    use_gpu: Optional[bool] = None  # default: when the cluster has GPUs
    compile: bool = False
    activation_checkpointing: bool = False
    trainable: str = "all"  # or "image-head": only the output head's image-token rows (Anole's recipe)
    checkpoint_every: int = 100
    keep: int = 3
    max_failures: int = 3
    log_every: int = 10
    ray_address: Optional[str] = None

    @property
    def run_name(self) -> str:
        return self.name or f"cm3-{self.stage}"

    @property
    def run_dir(self) -> Path:
        return self.storage.resolve() / self.run_name


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path  # the exported inference checkpoint
    steps: int
    final_loss: Optional[float]
    metrics: Path
    loss_curve: Path


# Driver: checks


def training_shards(folder: Path) -> list[Path]:
    """Complete shards (`NNNNN.parquet` + `NNNNN_stats.json`), or every *.parquet in a folder without stats files."""
    from cm3.pipeline.raw_shards import complete_shards, parquet_path

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: shard folder not found")
    if any(folder.glob("*_stats.json")):
        paths = [parquet_path(folder, shard) for shard in complete_shards(folder)]
    else:
        paths = sorted(folder.glob("*.parquet"))
    if not paths:
        raise ValueError(f"{folder}: no shards to train on (expected NNNNN.parquet files with NNNNN_stats.json)")
    return paths


def shard_columns(paths: list[Path], stage: str, retrieved_max: int) -> list[str]:
    """The columns to read, after checking every shard's footer: unreadable or unsuitable shards fail here,
    by name, instead of deep inside a worker."""
    import pyarrow.parquet as pq

    rows, names = 0, None
    for path in paths:
        try:
            meta = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types for a corrupt or truncated file
            raise ValueError(f"{path}: unreadable shard ({err})") from err
        rows += meta.metadata.num_rows
        if names is None:
            names = set(meta.schema_arrow.names)
            columns = _columns_for(names, stage, retrieved_max, path)
        elif missing := sorted(set(columns) - set(meta.schema_arrow.names)):
            raise ValueError(f"{path}: missing column(s) {missing} that {paths[0]} has")
    if rows == 0:
        raise ValueError(f"{paths[0].parent}: the shards hold no rows")
    return columns


def _columns_for(names: set[str], stage: str, retrieved_max: int, path: Path) -> list[str]:
    if stage == "sft" and SFT_COLUMN in names:
        return [SFT_COLUMN]
    if not set(DOCUMENT_COLUMNS) <= names:
        wanted = f"'{SFT_COLUMN}' or " if stage == "sft" else ""
        raise ValueError(f"{path}: expected columns {wanted}{list(DOCUMENT_COLUMNS)}, found {sorted(names)}")
    neighbours = [c for c in NEIGHBOUR_COLUMNS if c in names]
    if stage == "pretrain" and retrieved_max > 0 and len(neighbours) < len(NEIGHBOUR_COLUMNS):
        raise ValueError(f"{path}: not a retrieval-augmented shard (no {list(NEIGHBOUR_COLUMNS)}); build them "
                         "with `cm3 build-index`, or pass --retrieved-max 0")
    return [*DOCUMENT_COLUMNS, *neighbours]


def init_checkpoint(init: Path) -> Path:
    """The inference checkpoint folder that --init names: the folder itself or a training run's final/."""
    from cm3.model.checkpoint import MARKER

    for candidate in (init, init / FINAL_DIR):
        if (candidate / MARKER).is_file():
            return candidate
    raise FileNotFoundError(f"{init}: --init is not a cm3 checkpoint nor a training run folder with {FINAL_DIR}/ "
                            f"({MARKER} not found)")


def with_image_offset(overrides: dict[str, Any], tokenizer) -> dict[str, Any]:
    """`--set image_grid=N` on a new model: its image ids start at the tokenizer's image offset, and N x N must
    be the tokenizer's tokens per image (the grid the VQ-GAN lays its codes on, in raster order)."""
    grid = overrides.get("image_grid") or 0
    if not grid:
        return overrides
    tokens = tokenizer.tokens_per_image
    if grid * grid != tokens:
        raise ValueError(f"image_grid={grid} is a {grid}x{grid} = {grid * grid}-token grid, but the tokenizer "
                         f"gives {tokens} tokens per image; set image_grid={round(tokens ** 0.5)}")
    return {**overrides, "image_offset": tokenizer.vocab.image_offset}


def latest_run_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete training checkpoint in a run folder (names carry the zero-padded step)."""
    from cm3.model.training import STATE_FILE

    done = sorted(p.parent for p in run_dir.glob(f"checkpoint_*/{STATE_FILE}"))
    return done[-1] if done else None


@dataclass
class Plan:
    """What every worker needs, as plain data (it travels in `train_loop_config`)."""

    model: dict
    vocab: dict
    sequences: dict
    total_steps: int
    batch_size: int
    accumulation: int
    seed: int
    run_dir: str
    run_name: str
    init: Optional[str]
    compile: bool
    activation_checkpointing: bool
    trainable: str
    threads: Optional[int]
    checkpoint_every: int
    log_every: int
    fail_at_step: Optional[int]


def plan_run(options: TrainOptions):
    """(Plan, tokenizer, shard paths, columns) after every check that can fail on bad input."""
    from cm3.model.config import CM3Config
    from cm3.model.sequences import SequenceConfig
    from cm3.model.training import TRAINABLE, grad_accumulation, total_steps_for
    from cm3.tokenizers.multimodal import MultimodalTokenizer

    if options.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {options.stage!r}")
    if options.trainable not in TRAINABLE:
        raise ValueError(f"--trainable must be one of {TRAINABLE}, got {options.trainable!r}")
    if options.stage == "sft" and options.init is None:
        raise ValueError("stage sft needs --init: a pretrained cm3 checkpoint (or the pretrain run folder)")
    init = init_checkpoint(options.init) if options.init is not None else None
    paths = training_shards(options.shards)
    columns = shard_columns(paths, options.stage, options.retrieved_max)
    if options.tokenizer is None and init is None:
        raise ValueError("give --tokenizer (the vocabulary to train with) or --init (a checkpoint that has one)")
    tokenizer = MultimodalTokenizer.load(options.tokenizer if options.tokenizer is not None else init / "tokenizer")
    vocab_size = tokenizer.vocab.size
    if options.cm3 and not tokenizer.vocab.num_sentinels:
        raise ValueError("this vocabulary has no <mask:i> tokens for CM3's infilling objective (a converted "
                         "Chameleon's has none): train with --no-cm3 (next-token prediction, as Chameleon was tuned)")
    if init is not None:
        config = CM3Config.from_dict(json.loads((init / "config.json").read_text()))
        if config.vocab_size != vocab_size:
            raise ValueError(f"--init {init} has vocab_size {config.vocab_size} but the tokenizer "
                             f"{options.tokenizer or init / 'tokenizer'} has {vocab_size}; they must match")
        if options.model_overrides:
            raise ValueError(f"--set {sorted(options.model_overrides)} cannot change the shape of the --init model")
        if options.trainable == "image-head" and config.tie_embeddings:
            raise ValueError(f"--trainable image-head needs an untied output head; --init {init} ties it to the "
                             "token embedding (a converted Chameleon does not)")
    else:
        size = {"max_seq_len": options.seq_len} if options.seq_len else {}
        overrides = with_image_offset({**size, **options.model_overrides}, tokenizer)
        config = CM3Config.from_preset(options.preset, vocab_size=vocab_size, **overrides)
    schedule = {"lr": options.lr, "warmup_steps": options.warmup_steps, "batch_tokens": options.batch_tokens}
    config = CM3Config.from_dict({**config.to_dict(), **{k: v for k, v in schedule.items() if v is not None}})

    previous = latest_run_checkpoint(options.run_dir)
    if previous is not None:
        saved = json.loads((previous / "config.json").read_text())["vocab_size"]
        if saved != vocab_size:
            raise ValueError(f"{previous} (the run being resumed) has vocab_size {saved} but the tokenizer has "
                             f"{vocab_size}; use another --name or --storage for a new run")
    seq_len = options.seq_len or config.max_seq_len
    if seq_len > config.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    sequences = SequenceConfig(seq_len=seq_len, retrieved_min=options.retrieved_min,
                               retrieved_max=options.retrieved_max, image_first=options.image_first, cm3=options.cm3)
    if options.threads_per_worker is not None and options.threads_per_worker < 1:
        raise ValueError(f"threads_per_worker must be >= 1, got {options.threads_per_worker}")
    for name in ("batch_size", "num_workers", "checkpoint_every", "keep", "log_every"):
        if getattr(options, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(options, name)}")
    fail_at = os.environ.get(FAIL_AT_STEP_ENV)
    plan = Plan(
        model=config.to_dict(), vocab=tokenizer.vocab.to_dict(), sequences=asdict(sequences),
        total_steps=total_steps_for(config, options.steps),
        batch_size=options.batch_size,
        accumulation=grad_accumulation(config.batch_tokens, options.batch_size, seq_len, options.num_workers),
        seed=options.seed, run_dir=str(options.run_dir), run_name=options.run_name,
        init=str(init) if init is not None else None, compile=options.compile,
        activation_checkpointing=options.activation_checkpointing, trainable=options.trainable,
        threads=options.threads_per_worker,
        checkpoint_every=options.checkpoint_every,
        log_every=options.log_every, fail_at_step=int(fail_at) if fail_at else None,
    )
    return plan, tokenizer, paths, columns


# Driver: the run


def absolute_paths(options: TrainOptions) -> TrainOptions:
    """Ray workers do not run in the driver's folder: every path they are handed must be absolute."""
    import dataclasses

    fields = ("shards", "storage", "tokenizer", "init", "out")
    return dataclasses.replace(options, **{name: Path(getattr(options, name)).resolve()
                                           for name in fields if getattr(options, name) is not None})


def run_training(options: TrainOptions) -> TrainResult:
    """Check inputs, train on Ray (resuming the run if it has checkpoints), export the inference checkpoint."""
    options = absolute_paths(options)
    plan, tokenizer, paths, columns = plan_run(options)

    import ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cm3.model.checkpoint import save_checkpoint
    from cm3.model.decoder import CM3
    from cm3.model.train_metrics import METRICS_FILE, plot_loss_curve, read_metrics
    from cm3.workflows.ray_session import connect

    connect(options.ray_address)
    use_gpu = options.use_gpu if options.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    resources = {"CPU": options.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    check_data_cpus(ray.cluster_resources().get("CPU", 0.0), options.num_workers, options.cpus_per_worker)
    dataset = ray.data.read_parquet([str(p) for p in paths], num_cpus=READ_CPUS_PER_WORKER,
                                    concurrency=1).select_columns(columns)
    run_dir = options.run_dir
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=asdict(plan),
        scaling_config=ScalingConfig(num_workers=options.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=options.run_name, storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=options.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=options.keep),
        ),
        datasets={"train": dataset},
        # Every worker sees all rows in file order and keeps its own stride of them (packed_windows):
        # the data order then depends on nothing but the seed, which is what makes resuming exact.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )
    print(f"training {options.stage}: {plan.total_steps} steps, {options.num_workers} worker(s) "
          f"({'GPU' if use_gpu else 'CPU'}), {plan.accumulation} micro-batch(es) of {plan.batch_size} x "
          f"{plan.sequences['seq_len']} per step; run folder {run_dir}", flush=True)
    result = trainer.fit()

    with result.checkpoint.as_directory() as directory:
        model = CM3.from_pretrained(directory)
    out = options.out or run_dir / FINAL_DIR
    save_checkpoint(out, model, tokenizer, {"stage": options.stage, "run": str(run_dir), "steps": plan.total_steps,
                                            "preset": options.preset, "init": plan.init})
    records = read_metrics(run_dir / METRICS_FILE)
    curve = plot_loss_curve(records, run_dir / LOSS_CURVE)
    final_loss = records[-1]["loss"] if records else None
    print(f"done: {out} (cm3 inference checkpoint), metrics {run_dir / METRICS_FILE}, loss curve {curve}",
          flush=True)
    return TrainResult(run_dir, out, plan.total_steps, final_loss, run_dir / METRICS_FILE, curve)


def check_data_cpus(cluster_cpus: float, num_workers: int, cpus_per_worker: float) -> None:
    """Fail before starting when the train workers would leave too few CPUs for every worker's data read
    (`READ_CPUS_PER_WORKER` each, all at once): that run would hang before step 1, not fail."""
    needed = num_workers * (cpus_per_worker + READ_CPUS_PER_WORKER)
    if needed > cluster_cpus + 1e-9:
        fit = (cluster_cpus / num_workers) - READ_CPUS_PER_WORKER
        hint = f"use --cpus-per-worker {fit:g} or less" if fit > 0 else "use fewer --num-workers"
        raise ValueError(f"{num_workers} worker(s) x {cpus_per_worker:g} CPU plus {READ_CPUS_PER_WORKER:g} CPU each "
                         f"for reading data need {needed:g} CPUs; the Ray cluster has {cluster_cpus:g}: {hint}")


# Workers


def train_loop(loop_config: dict) -> None:
    """One Ray Train worker: build or restore the model, stream CM3 windows, step, log, checkpoint."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from cm3.model.config import CM3Config
    from cm3.model.decoder import CM3
    from cm3.model.sequences import SequenceConfig
    from cm3.model.train_metrics import METRICS_FILE, DashboardGauges, MetricsLog
    from cm3.model.training import (Batch, DataPosition, TokenKinds, TrainState, build_optimizer,
                                    flops_per_token, learning_rate, load_train_checkpoint, packed_windows,
                                    peak_flops, train_image_head_only, train_step)
    from cm3.tokenizers.vocabulary import vocabulary_from_dict

    plan = Plan(**loop_config)
    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    vocab = vocabulary_from_dict(plan.vocab)
    sequences = SequenceConfig(**plan.sequences)
    config = CM3Config.from_dict(plan.model)
    run_dir = Path(plan.run_dir)

    optimizer_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            model, optimizer_state, state = load_train_checkpoint(Path(directory))
        config = model.config
    else:
        torch.manual_seed(plan.seed)
        model = CM3.from_pretrained(plan.init) if plan.init else CM3(config)
        state = TrainState(step=0, tokens_seen=0, positions=[asdict(DataPosition())] * world, seed=plan.seed,
                           config=config.to_dict())
    if len(state.positions) != world:
        print(f"warning: the checkpoint was written by {len(state.positions)} worker(s), this run has {world}; "
              "the data pass restarts from its beginning", flush=True)
        epoch = min(p["epoch"] for p in state.positions)
        state.positions = [asdict(DataPosition(epoch, 0))] * world
    start_step = state.step
    if plan.trainable == "image-head":
        train_image_head_only(model, vocab)

    model, forward, sync, fsdp = parallelize(model.to(device), device, world, plan)
    optimizer = build_optimizer(model, config)
    if optimizer_state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=fsdp))

    shard = ray.train.get_dataset_shard("train")

    def rows_of_epoch(epoch: int):
        for batch in shard.iter_batches(batch_size=256, batch_format="pyarrow"):
            yield from batch.to_pylist()

    stream = packed_windows(rows_of_epoch, vocab, sequences, plan.seed, DataPosition(**state.positions[rank]),
                            rank, world)
    kinds = TokenKinds(vocab)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    peak = peak_flops(device)
    flops = flops_per_token(config, sequences.seq_len)
    log = MetricsLog(run_dir / METRICS_FILE, resume_after_step=start_step if checkpoint else None) if rank == 0 else None
    gauges = DashboardGauges(plan.run_name) if rank == 0 else None
    if rank == 0 and start_step:
        print(f"resumed from step {start_step} ({state.tokens_seen} tokens seen)", flush=True)

    for step in range(start_step, plan.total_steps):
        if plan.fail_at_step == step and rank == 0 and not (run_dir / ".failed_once").exists():
            (run_dir / ".failed_once").touch()
            os._exit(1)  # the test hook: a worker process dying mid-run
        started = time.perf_counter()
        micro_batches = []
        for _ in range(plan.accumulation):
            windows = [next(stream) for _ in range(plan.batch_size)]
            position = windows[-1][1]
            micro_batches.append(Batch.stack([w for w, _ in windows], device))
        lr = learning_rate(step, config, plan.total_steps)
        stats = train_step(forward, optimizer, micro_batches, lr, config.grad_clip, kinds, autocast, sync,
                           process_group=world > 1)
        seconds = time.perf_counter() - started
        state.step, state.tokens_seen = step + 1, state.tokens_seen + stats.tokens
        tokens_per_s = stats.tokens / seconds
        record = {"step": step + 1, "loss": stats.loss, "text_loss": stats.text_loss,
                  "image_loss": stats.image_loss, "lr": lr, "grad_norm": stats.grad_norm,
                  "tokens_per_s": tokens_per_s, "mfu": flops * tokens_per_s / (peak * world) if peak else None,
                  "tokens_seen": state.tokens_seen, "epoch": position.epoch, "start_step": start_step,
                  "world_size": stats.workers, "threads": torch.get_num_threads(),
                  "time": time.time()}
        if rank == 0:
            log.write(record)
            gauges.set(record)
            if (step + 1) % plan.log_every == 0 or step + 1 == plan.total_steps or step == start_step:
                mfu = f" MFU {record['mfu']:.1%}" if peak else ""
                print(f"step {step + 1}/{plan.total_steps} loss {stats.loss:.4f} (text {stats.text_loss:.4f}, "
                      f"image {stats.image_loss:.4f}) lr {lr:.2e} grad {stats.grad_norm:.2f} "
                      f"{tokens_per_s:,.0f} tok/s{mfu}", flush=True)

        if (step + 1) % plan.checkpoint_every == 0 or step + 1 == plan.total_steps:
            positions = [None] * world
            if world > 1:
                dist.all_gather_object(positions, asdict(position))
            else:
                positions = [asdict(position)]
            state.positions = positions
            report_checkpoint(model, optimizer, config, state, record, rank)
    if log is not None:
        log.close()


def parallelize(model, device, world: int, plan: Plan):
    """(model, forward module, grad-sync context, is_fsdp). Several GPU workers: FSDP2 (`fully_shard` per
    block, then the root); several CPU workers: DDP over gloo; then optional activation checkpointing and
    torch.compile. State dicts are always taken from `model`, never from a wrapper."""
    import contextlib

    import torch
    from torch.utils.checkpoint import checkpoint

    if plan.activation_checkpointing:
        for block in model.blocks:  # recompute each block in backward: memory for FLOPs, keys unchanged
            block.forward = _checkpointed(block.forward, checkpoint)
    fsdp = world > 1 and device.type == "cuda"
    forward, sync = model, None
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)

        def sync(last: bool):
            model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model)

        def sync(last: bool):
            return contextlib.nullcontext() if last else forward.no_sync()
    if plan.compile:
        forward = torch.compile(forward)
    return model, forward, sync, fsdp


def _checkpointed(forward, checkpoint):
    def run(*args):
        return checkpoint(forward, *args, use_reentrant=False)

    return run


def report_checkpoint(model, optimizer, config, state, metrics: dict, rank: int) -> None:
    """Gather full weights and optimizer state (every rank takes part under FSDP), rank 0 writes them to a
    local folder, and `ray.train.report` copies it to storage and commits it (Ray keeps the newest N)."""
    import ray.train
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from cm3.model.training import save_train_checkpoint

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    metrics = {k: v for k, v in metrics.items() if v is not None}
    name = f"checkpoint_{state.step:07d}"
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_train_checkpoint(Path(directory), weights, optimizer_state, config, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=name)


# Command line


def _parse_overrides(values: list[str]) -> dict[str, Any]:
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
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer folder (default: the one in --init)."),
    init: Optional[Path] = typer.Option(None, help="Start from this cm3 checkpoint or pretrain run folder (sft: required)."),
    storage: Path = typer.Option(Path("runs/train"), help="Folder for run folders (checkpoints, metrics)."),
    name: Optional[str] = typer.Option(None, help="Run name (default: cm3-STAGE); the same name resumes."),
    out: Optional[Path] = typer.Option(None, help="Inference checkpoint to export (default: STORAGE/NAME/final)."),
    preset: str = typer.Option("tiny", help="Model preset: tiny, 350m, 760m, 7b (ignored with --init)."),
    set_: list[str] = typer.Option([], "--set", help="Override a model config field, e.g. --set n_layers=2."),
    seq_len: Optional[int] = typer.Option(None, min=8, help="Tokens per training window (default: max_seq_len)."),
    batch_size: int = typer.Option(8, min=1, help="Sequences per micro-batch per worker."),
    batch_tokens: Optional[int] = typer.Option(None, min=1, help="Tokens per optimizer step (default: preset's)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Optimizer steps (default: preset's tokens / batch)."),
    lr: Optional[float] = typer.Option(None, min=0.0, help="Peak learning rate (default: preset's)."),
    warmup_steps: Optional[int] = typer.Option(None, min=0, help="Warm-up steps (capped at 10% of the run)."),
    retrieved_min: int = typer.Option(2, min=0, help="Fewest retrieved documents per example."),
    retrieved_max: int = typer.Option(2, min=0, help="Most retrieved documents per example."),
    image_first: float = typer.Option(0.5, min=0.0, max=1.0,
                                      help="Share of main documents laid out image first (captioning order)."),
    cm3: bool = typer.Option(True, help="CM3 span objective (--no-cm3: plain causal LM)."),
    seed: int = typer.Option(0, help="Initialisation and data seed."),
    num_workers: int = typer.Option(1, min=1, help="Ray Train workers (one GPU each when the cluster has GPUs)."),
    cpus_per_worker: float = typer.Option(1.0, min=0.01, help="CPUs per worker (leave some for Ray Data)."),
    threads_per_worker: Optional[int] = typer.Option(None, min=1, help="torch threads per worker (default: one per CPU)."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--cpu", help="Force GPU or CPU workers (default: GPU if any)."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    activation_checkpointing: bool = typer.Option(False, "--activation-checkpointing", help="Recompute blocks in backward."),
    trainable: str = typer.Option("all", help="all, or image-head: only the output head's image-token rows (Anole's "
                                              "recipe for Chameleon; needs an untied head)."),
    checkpoint_every: int = typer.Option(100, min=1, help="Steps between checkpoints."),
    keep: int = typer.Option(3, min=1, help="Checkpoints kept."),
    max_failures: int = typer.Option(3, min=-1, help="Worker failures survived (-1: no limit)."),
    log_every: int = typer.Option(10, min=1, help="Steps between progress lines."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join; default: start a local one."),
) -> None:
    """Train the decoder on Ray: pretrain on retrieval-augmented shards, or instruction-tune (sft).

    Re-running the same command resumes from the run's last checkpoint.

    Examples:

      cm3 train --stage pretrain --shards data/augmented --tokenizer tokenizer/ --steps 2000

      cm3 train --stage sft --shards data/sft --init runs/train/cm3-pretrain --steps 500 --lr 1e-4

      cm3 train --stage sft --shards data/sft-chameleon --init ckpt/chameleon-7b --no-cm3 --trainable image-head \
          --activation-checkpointing --num-workers 8 --batch-size 1 --steps 1000 --lr 2e-4
    """
    try:
        options = TrainOptions(
            stage=stage, shards=shards, storage=storage, name=name, tokenizer=tokenizer, init=init, out=out,
            preset=preset, model_overrides=_parse_overrides(set_), seq_len=seq_len, batch_size=batch_size,
            batch_tokens=batch_tokens, steps=steps, lr=lr, warmup_steps=warmup_steps, retrieved_min=retrieved_min,
            retrieved_max=retrieved_max, image_first=image_first, cm3=cm3, seed=seed, num_workers=num_workers,
            cpus_per_worker=cpus_per_worker, threads_per_worker=threads_per_worker, use_gpu=gpu, compile=compile_model,
            activation_checkpointing=activation_checkpointing, trainable=trainable, checkpoint_every=checkpoint_every,
            keep=keep,
            max_failures=max_failures, log_every=log_every, ray_address=ray_address,
        )
        run_training(options)
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)


if __name__ == "__main__":
    typer.run(train_command)
