"""The Ray Train driver of `cm3 train`: pretrain (retrieval-augmented shards) or instruction-tune the decoder.

It checks every input before anything starts (clear errors, no checkpoint touched), lists the shards' units of
reading, and runs `cm3.model.train_loop.train` in each `TorchTrainer` worker, which reads its own share of the
shards, trains, and reports a checkpoint every `checkpoint_every` steps:

    STORAGE/NAME/checkpoint_0000100/   weights (safetensors) + optimizer.pt + train_state.json (Ray keeps N)
    STORAGE/NAME/metrics.jsonl         one line per step: loss (text/image), lr, grad norm, tokens/s, MFU,
                                       data wait, memory
    STORAGE/NAME/profile/rankR.json    with --profile: a torch profiler trace
    STORAGE/NAME/loss_curve.png        drawn at the end
    STORAGE/NAME/final/                the cm3 inference checkpoint (`cm3 generate --checkpoint`)

Running the same command again (same --storage and --name) resumes from the last checkpoint with the same
data order; a worker that dies is restarted from it by Ray (`--max-failures`). With --ray-address the workers
run on that cluster's nodes: the shards and --storage must be at the same paths on every node.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from cm3.core.errors import InputError

STAGES = ("pretrain", "sft")
DOCUMENT_COLUMNS = ("text_ids", "image_ids")
NEIGHBOUR_COLUMNS = ("neighbour_text_ids", "neighbour_image_ids")
SFT_COLUMN = "ids"
FINAL_DIR = "final"
LOSS_CURVE = "loss_curve.png"
INPUT_ERROR_FILE = "input_error.json"  # a worker's InputError (a damaged shard), for its retries and the driver
FAIL_AT_STEP_ENV = "CM3_TRAIN_FAIL_AT_STEP"  # test hook: rank 0 exits at this step, once per run folder
PAUSE_AT_STEP_ENV = "CM3_TRAIN_PAUSE_AT_STEP"  # test hook: rank 0 stops at this step until killed, once per folder


@dataclass
class TrainOptions:
    """The options of `cm3 train`; the command takes its defaults from here."""

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
    # whole CPUs above one, so a worker that should use both cores of a 2-core box holds 1 CPU and asks for 2
    # threads here.
    threads_per_worker: Optional[int] = None
    use_gpu: Optional[bool] = None  # default: when the cluster has GPUs
    parallelism: str = "fsdp"  # fsdp, ddp or none (with one worker: the plain model)
    activation_checkpointing: str = "none"  # none, full, or N: every N-th block
    compile: bool = False
    float8: bool = False
    trainable: str = "all"  # or "image-head": only the output head's image-token rows (Anole's recipe)
    profile: int = 0  # steps to trace with the torch profiler (0: none)
    prefetch: int = 2  # steps of batches the background producer keeps ready
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


# Checks


def training_shards(folder: Path) -> list[Path]:
    """Complete shards (`NNNNN.parquet` + `NNNNN_stats.json`), or every *.parquet in a folder without stats files."""
    from cm3.core.shards import complete_shards, parquet_path

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: shard folder not found")
    if any(folder.glob("*_stats.json")):
        paths = [parquet_path(folder, shard) for shard in complete_shards(folder)]
    else:
        paths = sorted(folder.glob("*.parquet"))
    if not paths:
        raise InputError(f"{folder}: no shards to train on (expected NNNNN.parquet files with NNNNN_stats.json)")
    return paths


def shard_columns(paths: list[Path], stage: str, retrieved_max: int, workers: int = 1) -> list[str]:
    """The columns to read, after checking every shard's footer: unreadable or unsuitable shards fail here,
    by name, instead of deep inside a worker."""
    from cm3.core.intact import parquet_metadata

    rows, names = 0, None
    for path in paths:
        meta = parquet_metadata(path)
        rows += meta.num_rows
        if names is None:
            names = set(meta.schema.to_arrow_schema().names)
            columns = _columns_for(names, stage, retrieved_max, path)
        elif missing := sorted(set(columns) - set(meta.schema.to_arrow_schema().names)):
            raise InputError(f"{path}: missing column(s) {missing} that {paths[0]} has")
    if rows < workers:
        raise InputError(f"{paths[0].parent}: the shards hold {rows} row(s), fewer than the {workers} worker(s)")
    return columns


def _columns_for(names: set[str], stage: str, retrieved_max: int, path: Path) -> list[str]:
    if stage == "sft" and SFT_COLUMN in names:
        return [SFT_COLUMN]
    if not set(DOCUMENT_COLUMNS) <= names:
        wanted = f"'{SFT_COLUMN}' or " if stage == "sft" else ""
        raise InputError(f"{path}: expected columns {wanted}{list(DOCUMENT_COLUMNS)}, found {sorted(names)}")
    neighbours = [c for c in NEIGHBOUR_COLUMNS if c in names]
    if stage == "pretrain" and retrieved_max > 0 and len(neighbours) < len(NEIGHBOUR_COLUMNS):
        raise InputError(f"{path}: not a retrieval-augmented shard (no {list(NEIGHBOUR_COLUMNS)}); build them "
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


def ac_every(value: str) -> int:
    """--activation-checkpointing: none -> 0, full -> 1 (every block), N -> every N-th block."""
    named = {"none": 0, "full": 1}
    if value in named:
        return named[value]
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(f"--activation-checkpointing {value!r}: expected none, full, or N (every N-th block)")


def check_worker_cpus(cluster_cpus: float, num_workers: int, cpus_per_worker: float) -> None:
    """Fail before starting when the workers ask for more CPUs than the cluster has: Ray would wait for them
    forever instead of failing."""
    needed = num_workers * cpus_per_worker
    if needed > cluster_cpus + 1e-9:
        raise ValueError(f"{num_workers} worker(s) x {cpus_per_worker:g} CPU need {needed:g} CPUs; the Ray cluster "
                         f"has {cluster_cpus:g}: use --cpus-per-worker {cluster_cpus / num_workers:g} or less")


def plan_run(options: TrainOptions):
    """(LoopConfig, tokenizer) after every check that can fail on bad input."""
    import importlib.util

    from cm3.core.intact import load_json
    from cm3.model.config import CM3Config
    from cm3.model.decoder import check_weights
    from cm3.model.parallelize import ParallelOptions
    from cm3.model.sequences import SequenceConfig
    from cm3.model.train_checkpoint import latest_checkpoint
    from cm3.model.train_data import shard_units
    from cm3.model.train_loop import LoopConfig
    from cm3.model.train_step import TRAINABLE, grad_accumulation, total_steps_for
    from cm3.pipeline.tokenize import check_made_with, tokenizer_fingerprint
    from cm3.tokenizers.multimodal import MultimodalTokenizer

    if options.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {options.stage!r}")
    if options.trainable not in TRAINABLE:
        raise ValueError(f"--trainable must be one of {TRAINABLE}, got {options.trainable!r}")
    if options.stage == "sft" and options.init is None:
        raise ValueError("stage sft needs --init: a pretrained cm3 checkpoint (or the pretrain run folder)")
    for name in ("batch_size", "num_workers", "checkpoint_every", "keep", "log_every", "prefetch"):
        if getattr(options, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(options, name)}")
    if options.threads_per_worker is not None and options.threads_per_worker < 1:
        raise ValueError(f"threads_per_worker must be >= 1, got {options.threads_per_worker}")
    if options.profile < 0:
        raise ValueError(f"--profile must be >= 0 steps, got {options.profile}")
    parallel = ParallelOptions(options.parallelism, ac_every(options.activation_checkpointing), options.compile,
                               options.float8)
    if parallel.parallelism == "none" and options.num_workers > 1:
        raise ValueError(f"--parallelism none trains one worker, not {options.num_workers}: use fsdp or ddp")
    if options.float8 and importlib.util.find_spec("torchao") is None:
        raise ValueError("--float8 needs torchao: pip install 'cm3[float8]'")
    init = init_checkpoint(options.init) if options.init is not None else None
    paths = training_shards(options.shards)
    columns = shard_columns(paths, options.stage, options.retrieved_max, options.num_workers)
    if options.tokenizer is None and init is None:
        raise ValueError("give --tokenizer (the vocabulary to train with) or --init (a checkpoint that has one)")
    tokenizer = MultimodalTokenizer.load(options.tokenizer if options.tokenizer is not None else init / "tokenizer")
    vocab_size = tokenizer.vocab.size
    if options.cm3 and not tokenizer.vocab.num_sentinels:
        raise ValueError("this vocabulary has no <mask:i> tokens for CM3's infilling objective (a converted "
                         "Chameleon's has none): train with --no-cm3 (next-token prediction, as Chameleon was tuned)")
    tokenizer_dir = options.tokenizer if options.tokenizer is not None else init / "tokenizer"
    if options.tokenizer is not None and init is not None:
        given, carried = (tokenizer_fingerprint(t, content_only=True) for t in (options.tokenizer, init / "tokenizer"))
        if given != carried:
            raise InputError(f"--tokenizer {options.tokenizer} ({given[:12]}) is not the tokenizer of --init {init} "
                             f"({carried[:12]}); leave --tokenizer out to train with the checkpoint's own")
    check_made_with(options.shards, tokenizer_dir, "--tokenizer" if options.tokenizer is not None else
                    "the tokenizer of --init")
    if init is not None:
        config = CM3Config.from_dict(load_json(init / "config.json"))
        check_weights(init)  # a damaged --init is named here, not inside a Ray worker (which Ray would retry)
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

    previous = latest_checkpoint(options.run_dir)
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
    fail_at, pause_at = os.environ.get(FAIL_AT_STEP_ENV), os.environ.get(PAUSE_AT_STEP_ENV)
    loop = LoopConfig(
        model=config.to_dict(), vocab=tokenizer.vocab.to_dict(), sequences=asdict(sequences),
        units=[asdict(u) for u in shard_units([str(p) for p in paths], options.num_workers)], columns=columns,
        total_steps=total_steps_for(config, options.steps), batch_size=options.batch_size,
        accumulation=grad_accumulation(config.batch_tokens, options.batch_size, seq_len, options.num_workers),
        run_dir=str(options.run_dir), run_name=options.run_name, seed=options.seed,
        init=str(init) if init is not None else None, parallelism=parallel.parallelism, ac_every=parallel.ac_every,
        compile=parallel.compile, float8=parallel.float8, trainable=options.trainable,
        threads=options.threads_per_worker,
        checkpoint_every=options.checkpoint_every, log_every=options.log_every, profile_steps=options.profile,
        prefetch=options.prefetch, fail_at_step=int(fail_at) if fail_at else None,
        pause_at_step=int(pause_at) if pause_at else None,
    )
    return loop, tokenizer


# The run


def absolute_paths(options: TrainOptions) -> TrainOptions:
    """Ray workers do not run in the driver's folder: every path they are handed must be absolute."""
    import dataclasses

    fields = ("shards", "storage", "tokenizer", "init", "out")
    return dataclasses.replace(options, **{name: Path(getattr(options, name)).resolve()
                                           for name in fields if getattr(options, name) is not None})


def run_training(options: TrainOptions) -> TrainResult:
    """Check inputs, train on Ray (resuming the run if it has checkpoints), export the inference checkpoint."""
    options = absolute_paths(options)
    loop, tokenizer = plan_run(options)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cm3.model.checkpoint import save_checkpoint
    from cm3.model.decoder import CM3
    from cm3.model.train_metrics import METRICS_FILE, plot_loss_curve, read_metrics
    from cm3.workflows.ray_session import connect

    connect(options.ray_address)
    use_gpu = options.use_gpu if options.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    check_worker_cpus(ray.cluster_resources().get("CPU", 0.0), options.num_workers, options.cpus_per_worker)
    run_dir = options.run_dir
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config=asdict(loop),
        scaling_config=ScalingConfig(num_workers=options.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": options.cpus_per_worker,
                                                           **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(
            name=options.run_name, storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=options.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=options.keep),
        ),
    )
    marker = run_dir / INPUT_ERROR_FILE
    marker.unlink(missing_ok=True)
    print(f"training {options.stage}: {loop.total_steps} steps, {options.num_workers} worker(s) "
          f"({'GPU' if use_gpu else 'CPU'}), {loop.accumulation} micro-batch(es) of {loop.batch_size} x "
          f"{loop.sequences['seq_len']} per step; run folder {run_dir}", flush=True)
    try:
        result = trainer.fit()
    except Exception:
        _raise_input_error(marker)
        raise
    _raise_input_error(marker)

    with result.checkpoint.as_directory() as directory:
        model = CM3.from_pretrained(directory)
    out = options.out or run_dir / FINAL_DIR
    save_checkpoint(out, model, tokenizer, {"stage": options.stage, "run": str(run_dir), "steps": loop.total_steps,
                                            "preset": options.preset, "init": loop.init})
    records = read_metrics(run_dir / METRICS_FILE)
    curve = plot_loss_curve(records, run_dir / LOSS_CURVE)
    final_loss = records[-1]["loss"] if records else None
    print(f"done: {out} (cm3 inference checkpoint), metrics {run_dir / METRICS_FILE}, loss curve {curve}",
          flush=True)
    return TrainResult(run_dir, out, loop.total_steps, final_loss, run_dir / METRICS_FILE, curve)


# Workers


class RaySession:
    """`cm3.model.train_loop.Session` over `ray.train`: Ray hands out the checkpoint to resume from, copies
    reported checkpoints to storage and keeps the newest N; the gauges go to the Ray dashboard."""

    def __init__(self, run_name: str, run_dir: str):
        import ray
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node = ray.get_runtime_context().get_node_id()
        self.run_name = run_name
        self.run_dir = Path(run_dir)

    @contextlib.contextmanager
    def checkpoint(self):
        """Ray's registered checkpoint, unless a newer complete one is on disk (`resume_from`)."""
        import ray.train

        from cm3.model.train_checkpoint import resume_from

        checkpoint = ray.train.get_checkpoint()
        registered = Path(checkpoint.path) if checkpoint is not None else None
        chosen = resume_from(registered, self.run_dir)
        if chosen is None:
            yield None
        elif chosen != registered:
            yield chosen
        else:
            with checkpoint.as_directory() as directory:
                yield Path(directory)

    def report(self, metrics: dict, checkpoint: Optional[Path], name: str) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None,
                         checkpoint_dir_name=name)

    def gauges(self):
        from cm3.model.train_metrics import DashboardGauges

        return DashboardGauges(self.run_name)


def _raise_input_error(marker: Path) -> None:
    """The InputError a worker met (a damaged shard found only by reading it), raised in the driver (exit 2)."""
    from cm3.core.intact import load_json

    if marker.is_file():
        message = load_json(marker).get("message", "bad input")
        marker.unlink(missing_ok=True)
        raise InputError(message)


def ray_worker(loop_config: dict) -> None:
    """One Ray Train worker. Bad input (a damaged shard) cannot succeed on a retry: the first worker to meet it
    records it in the run folder, and the retries Ray starts (`--max-failures`) fail at once with it, before
    loading anything."""
    from cm3.core.files import write_json
    from cm3.core.intact import load_json
    from cm3.model.train_loop import LoopConfig, train

    marker = Path(loop_config["run_dir"]) / INPUT_ERROR_FILE
    if marker.is_file():
        raise InputError(load_json(marker).get("message", "bad input"))
    try:
        train(LoopConfig(**loop_config), RaySession(loop_config["run_name"], loop_config["run_dir"]))
    except Exception as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, InputError):
            cause = cause.__cause__
        if cause is not None:
            write_json(marker, {"message": str(cause)})
        raise
