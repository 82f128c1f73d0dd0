"""Every default of a `cm3` option has one owner: the library's options dataclass of that command, or the command
line alone for what only it decides (paths, switches, progress bars). Walks the whole typer app, so a new option
must be placed in one or the other, and a default written again in the command line cannot drift."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import MISSING, fields

import typer

from cm3.evaluation.options import (CAPTION_PROMPT, IMAGE_PATTERN, VQA_ANSWER_TOKENS, VQA_TEMPLATE,
                                    ImageToTextOptions, TextToImageOptions)
from cm3.index.build import IndexSettings
from cm3.index.faiss_index import parse_memory_size
from cm3.model.sampling_options import CAPTION_METHOD, CAPTION_TOKENS, SamplingConfig
from cm3.pipeline.download import DownloadSettings
from cm3.pipeline.tokenize import TokenizeSettings
from cm3.tokenizers.training_options import ClipTrainOptions, TrainOptions
from cm3.workflows.cli import app
from cm3.workflows.serve_options import ServeOptions

from conftest import REPO

DOWNLOAD, TOKENIZE, INDEX = DownloadSettings(), TokenizeSettings(), IndexSettings()
VQ, CLIP, SAMPLING = TrainOptions(), ClipTrainOptions(), SamplingConfig()
SERVE = ServeOptions(checkpoint="")
T2I = {f.name: f.default for f in fields(TextToImageOptions) if f.default is not MISSING}
I2T = {f.name: f.default for f in fields(ImageToTextOptions) if f.default is not MISSING}

# option -> the owner's default, per command (the option's name is the typer parameter's)
OWNED = {
    "ingest": {"threads": DOWNLOAD.thread_count, "cpus_per_task": DOWNLOAD.cpus_per_task,
               "shard_rows": DOWNLOAD.shard_rows, "image_size": DOWNLOAD.image_size,
               "resize_mode": DOWNLOAD.resize_mode, "timeout": DOWNLOAD.timeout, "retries": DOWNLOAD.retries,
               "max_shard_retry": DOWNLOAD.max_shard_retry},
    "tokenize": {"batch_size": TOKENIZE.batch_size, "encoders": TOKENIZE.encoders,
                 "cpus_per_encoder": TOKENIZE.cpus_per_encoder},
    "build-index": {"k": INDEX.retrieval.k, "max_similarity": INDEX.retrieval.max_similarity,
                    "query_dropout": INDEX.retrieval.query_dropout, "recall_target": INDEX.recall_target,
                    "memory_budget": INDEX.memory_budget_bytes},
    "tokenizer train-vq": {"steps": VQ.steps, "batch_size": VQ.batch_size, "lr": VQ.lr, "threads": VQ.num_threads,
                           "ema_decay": VQ.ema_decay},
    "clip train": {"model": CLIP.model_name, "steps": CLIP.steps, "batch_size": CLIP.batch_size, "lr": CLIP.lr},
    "generate": {"method": SAMPLING.method, "guidance": SAMPLING.guidance_scale,
                 "temperature": SAMPLING.temperature, "top_p": SAMPLING.top_p, "cd_alpha": SAMPLING.cd_alpha,
                 "cd_k": SAMPLING.cd_k, "seed": SAMPLING.seed, "retrieved": INDEX.retrieval.k,
                 "image_guidance": SAMPLING.image_guidance_scale},
    "serve": {"host": SERVE.host, "port": SERVE.port, "replicas": SERVE.replicas, "device": SERVE.device,
              "cpus_per_replica": SERVE.cpus_per_replica,
              "int8": SERVE.int8, "max_batch_images": SERVE.max_batch_images, "batch_wait_ms": SERVE.batch_wait_ms,
              "max_queued": SERVE.max_queued_requests, "max_body_bytes": SERVE.max_body_bytes},
    "eval text-to-image": {"samples": T2I["samples"], "retrieved": T2I["retrieved"], "guidance": T2I["guidance"],
                           "method": T2I["methods"], "rerank": T2I["rerank"], "seed": T2I["seed"],
                           "batch_size": T2I["batch_size"], "temperature": T2I["temperature"],
                           "top_p": T2I["top_p"], "cd_alpha": T2I["cd_alpha"], "cd_k": T2I["cd_k"]},
    "eval caption": {"seed": I2T["seed"], "batch_size": I2T["batch_size"], "max_new_tokens": I2T["max_new_tokens"],
                     "prompt": CAPTION_PROMPT},
    "eval vqa": {"seed": I2T["seed"], "batch_size": I2T["batch_size"], "max_new_tokens": VQA_ANSWER_TOKENS,
                 "image_pattern": IMAGE_PATTERN, "template": VQA_TEMPLATE},
    "caption": {"method": CAPTION_METHOD, "max_new_tokens": CAPTION_TOKENS, "seed": SAMPLING.seed},
}

def _ablation(kind):
    """How an ablation option's comma-separated text reads as its owner's tuple."""
    return lambda text: tuple(kind(part) for part in text.split(","))


# how an option's text reads as its owner's value
AS_OWNED = {("build-index", "memory_budget"): parse_memory_size,
            ("eval text-to-image", "retrieved"): _ablation(int), ("eval text-to-image", "guidance"): _ablation(float),
            ("eval text-to-image", "method"): _ablation(str)}

# defaults that only the command line has (no library function or dataclass carries them)
CLI_ONLY = {
    "eval text-to-image": {"device"},  # auto: the first GPU, else the CPU (the options take a resolved device)
    "eval caption": {"device"},
    "eval vqa": {"device"},
    "ingest": {"retry_failed", "progress"},
    "tokenize": {"progress"},
    "build-index": {"progress", "online"},
    "search": {"k"},
    "model init": {"preset", "seed"},
    "generate": {"n", "out", "rerank", "device", "int8"},
    "caption": {"device"},
    "sft convert": {"image_pattern", "shard_rows", "seed"},
    "sft demo": {"n", "seed", "shard_rows"},
    "tokenizer train-vq": {"preset", "device", "resume", "progress"},  # --warmup-steps: None = the preset's
    "tokenizer train-text": {"vocab_size", "caption_col"},
    "clip train": {"progress"},
    "demo-data serve": {"n", "seed", "split", "port"},
    "demo-data write-urls": {"base_url", "n", "seed", "split", "broken"},
    "demo": {"workdir", "small", "fresh", "stages"},
}
NOT_COVERED = {"train"}  # `cm3 train` reads its options from cm3.workflows.train.TrainOptions


def _commands(group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a sub-app (typer's own click: no isinstance on click's classes)
            yield from _commands(command, (*prefix, name))
        else:
            yield " ".join((*prefix, name)), command


COMMANDS = dict(_commands(typer.main.get_command(app)))


def test_every_option_default_is_its_owners():
    assert set(OWNED) | set(CLI_ONLY) | NOT_COVERED <= set(COMMANDS)  # no stale names
    for name, command in COMMANDS.items():
        if name in NOT_COVERED:
            continue
        owned, cli_only = OWNED.get(name, {}), CLI_ONLY.get(name, set())
        options = {p.name: p.default for p in command.params if p.param_type_name == "option" and p.name != "help"}
        assert set(owned) <= set(options), f"cm3 {name}: no option {set(owned) - set(options)}"
        for option, default in options.items():
            where = f"cm3 {name} --{option.replace('_', '-')}"
            if option in owned:
                value = AS_OWNED.get((name, option), lambda text: text)(default)
                assert value == owned[option] and type(value) is type(owned[option]), \
                    f"{where}: default {default!r}, its owner says {owned[option]!r}"
            else:
                assert default is None or option in cli_only, \
                    f"{where}: default {default!r} has no owner (an options dataclass) and is not marked CLI-only"


def test_the_command_line_starts_without_torch_ray_or_open_clip():
    """The defaults' owners are light modules: `cm3 --help` must not pay for importing the heavy libraries."""
    code = ("import sys, cm3.workflows.cli; "
            "print(' '.join(m for m in ('torch', 'ray', 'open_clip', 'faiss', 'img2dataset') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert proc.stdout.split() == []
