"""`cm3 train` end to end on a 2-layer, d=64 decoder: both stages learn, two FSDP workers survive a killed
worker, a SIGKILLed run resumes bit-identically, the same command trains on two nodes, bad inputs fail early
with the path named. One local Ray cluster serves the in-process runs; the resume test runs the `cm3` command
in subprocesses that start their own, the two-node test joins the loopback cluster of the ingest tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cm3.model.train_loop import PAUSED
from cm3.model.train_metrics import read_metrics
from cm3.workflows.train import PAUSE_AT_STEP_ENV
from conftest import BIN
from factories import (TRAIN_CAPTIONS, TRAIN_VQ, damage_a_page_header, make_tokenizer, write_augmented_shards,
                       write_sft_shards)

pytestmark = pytest.mark.slow
TINY = {"n_layers": 2, "d_model": 64, "n_heads": 2}
SEQ = 128
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    make_tokenizer(path, TRAIN_VQ, TRAIN_CAPTIONS)
    return path


@pytest.fixture(scope="module")
def vocab(tokenizer_dir):
    from cm3.tokenizers.multimodal import MultimodalTokenizer

    return MultimodalTokenizer.load(tokenizer_dir).vocab


def test_image_grid_takes_the_tokenizers_image_offset_and_must_match_its_grid(tokenizer_dir, vocab):
    from cm3.tokenizers.multimodal import MultimodalTokenizer
    from cm3.workflows.train import with_image_offset

    tokenizer = MultimodalTokenizer.load(tokenizer_dir)
    assert tokenizer.tokens_per_image == 64
    assert with_image_offset({"image_grid": 8, "d_model": 64}, tokenizer) == {
        "image_grid": 8, "d_model": 64, "image_offset": vocab.image_offset}
    assert with_image_offset({"d_model": 64}, tokenizer) == {"d_model": 64}
    with pytest.raises(ValueError, match="gives 64 tokens per image; set image_grid=8"):
        with_image_offset({"image_grid": 16}, tokenizer)


def options(stage: str, shards: Path, storage: Path, **overrides):
    from cm3.workflows.train import TrainOptions

    defaults = dict(stage=stage, shards=shards, storage=storage, name="run", seq_len=SEQ, batch_size=4,
                    batch_tokens=4 * SEQ, steps=24, lr=3e-3, warmup_steps=2, checkpoint_every=8,
                    cpus_per_worker=0.5, retrieved_min=1, retrieved_max=2, log_every=8, max_failures=1)
    if stage == "pretrain":
        defaults["model_overrides"] = TINY
    return TrainOptions(**{**defaults, **overrides})


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from cm3.workflows.ray_session import connect

    os.environ.update(RAY_ENV)
    connect(None, num_cpus=2, quiet=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tokenizer_dir, vocab, ray_local):
    from cm3.workflows.train import run_training

    root = tmp_path_factory.mktemp("pretrain")
    shards = write_augmented_shards(root / "shards", vocab)
    return run_training(options("pretrain", shards, root / "runs", tokenizer=tokenizer_dir))


def first_last(records: list[dict], n: int = 4) -> tuple[float, float]:
    losses = [r["loss"] for r in records]
    return float(np.mean(losses[:n])), float(np.mean(losses[-n:]))


def test_pretrain_lowers_loss_and_exports_a_checkpoint(pretrained, vocab):
    from cm3.model.checkpoint import load_checkpoint

    records = read_metrics(pretrained.metrics)
    assert [r["step"] for r in records] == list(range(1, 25))
    first, last = first_last(records)
    assert last < 0.8 * first, (first, last)
    assert all(r["text_loss"] > 0 and r["image_loss"] > 0 and r["tokens_per_s"] > 0 for r in records)
    assert all(0 <= r["data_wait"] < 1 and r["memory_gib"] > 0 and r["mfu"] is None for r in records)  # CPU: no peak
    assert {(r["nodes"], r["world_size"], r["attention"]) for r in records} == {(1, 1, "flash")}
    assert {r["threads"] for r in records} == {1}  # Ray's default for a worker holding half a CPU
    model, tokenizer = load_checkpoint(pretrained.checkpoint)
    assert model.config.vocab_size == vocab.size and model.config.n_layers == 2
    assert pretrained.loss_curve.stat().st_size > 0
    kept = sorted(p.name for p in pretrained.run_dir.glob("checkpoint_0*"))
    assert kept == ["checkpoint_0000008", "checkpoint_0000016", "checkpoint_0000024"]


def test_sft_from_the_pretrain_run_lowers_loss(pretrained, vocab, tmp_path):
    from cm3.workflows.train import run_training

    shards = write_sft_shards(tmp_path / "sft", vocab)
    result = run_training(options("sft", shards, tmp_path / "runs", init=pretrained.run_dir, steps=16,
                                  threads_per_worker=2))
    records = read_metrics(result.metrics)
    first, last = first_last(records)
    assert last < 0.8 * first, (first, last)
    assert {r["threads"] for r in records} == {2}  # asked for, although the worker holds half a CPU
    assert (result.checkpoint / "checkpoint.json").is_file()


def test_two_fsdp_workers_survive_a_killed_worker(tmp_path, tokenizer_dir, vocab, ray_local, monkeypatch):
    """FSDP2 over gloo with 2 workers at 0.5 CPU: rank 0 dies at step 10 (after the checkpoints at 4 and 8);
    Ray restarts both from the last registered checkpoint (`FailureConfig`), which holds both ranks' data
    positions, and the run ends with every step recorded once."""
    import json

    from cm3.model.train_checkpoint import STATE_FILE
    from cm3.workflows.train import FAIL_AT_STEP_ENV, run_training

    monkeypatch.setenv(FAIL_AT_STEP_ENV, "10")
    shards = write_augmented_shards(tmp_path / "shards", vocab, shards=1, rows=25)  # odd: ranks get 13 and 12 rows
    result = run_training(options("pretrain", shards, tmp_path / "runs", tokenizer=tokenizer_dir, steps=12,
                                  checkpoint_every=4, num_workers=2, parallelism="fsdp"))
    records = read_metrics(result.metrics)
    assert (result.run_dir / ".failed_once").exists()
    assert [r["step"] for r in records] == list(range(1, 13))  # past an epoch boundary on both ranks
    # the restarted workers began at a checkpoint (step 4, or 8 if Ray had registered it before the crash)
    assert {r["start_step"] for r in records if r["step"] > 8} <= {4, 8}
    assert all(r["world_size"] == 2 for r in records)
    assert records[-1]["tokens_seen"] == 12 * 2 * 4 * SEQ  # steps x ranks x batch x seq_len
    state = json.loads((result.run_dir / "checkpoint_0000012" / STATE_FILE).read_text())
    assert len(state["positions"]) == 2 and state["positions"][0] != state["positions"][1]


def test_workers_that_ask_for_more_cpus_than_the_cluster_has_fail_early():
    from cm3.workflows.train import check_worker_cpus

    check_worker_cpus(2.0, num_workers=4, cpus_per_worker=0.5)
    with pytest.raises(ValueError, match="cpus-per-worker 0.5 or less"):
        check_worker_cpus(2.0, num_workers=4, cpus_per_worker=1.0)


def train_command(shards: Path, tokenizer: Path, storage: Path, *extra: str) -> list[str]:
    return [str(BIN / "cm3"), "train", "--stage", "pretrain", "--shards", str(shards), "--tokenizer", str(tokenizer),
            "--storage", str(storage), "--name", "run", "--seq-len", str(SEQ), "--batch-size", "4", "--batch-tokens",
            str(4 * SEQ), "--lr", "3e-3", "--warmup-steps", "2", "--retrieved-min", "1",
            *[arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")], *extra]


def test_a_sigkilled_run_resumes_bit_identically(tmp_path, tokenizer_dir, vocab):
    """`cm3 train` killed by SIGKILL two steps past its first checkpoint, then run again: it resumes from the
    checkpoint, and the steps the killed run had already trained after it come out bit for bit the same."""
    shards = write_augmented_shards(tmp_path / "shards", vocab, shards=1)
    storage = tmp_path / "runs"
    command = train_command(shards, tokenizer_dir, storage, "--steps", "24", "--checkpoint-every", "10",
                            "--cpus-per-worker", "0.5", "--log-every", "10")
    env = {**os.environ, **RAY_ENV}
    # the first run stops before step 13 (two steps past the checkpoint of step 10; the next is 8 steps away), and
    # is killed once Ray has committed that checkpoint (the snapshot); the second run does not stop there
    proc = subprocess.Popen(command, env={**env, PAUSE_AT_STEP_ENV: "12"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = storage / "run"
    deadline = time.time() + 240
    while not ((run_dir / "checkpoint_manager_snapshot.json").exists()
               and (run_dir / PAUSED).exists()) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _stop_orphans(proc.pid)
    killed = read_metrics(run_dir / "metrics.jsonl")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(run_dir / "metrics.jsonl")
    resumed_at = records[-1]["start_step"]
    assert resumed_at >= 10 and resumed_at % 10 == 0 and len(killed) > resumed_at, (resumed_at, len(killed))
    assert [r["step"] for r in records] == list(range(1, 25))
    # before the checkpoint: the killed run's own records, kept; after it: the same numbers recomputed
    same = ("loss", "text_loss", "image_loss", "grad_norm", "tokens_seen", "epoch")
    assert [[r[k] for k in same] for r in records[:len(killed)]] == [[r[k] for k in same] for r in killed]
    assert all(r["start_step"] == resumed_at for r in records[resumed_at:])
    assert "resumed from step" in done.stdout + done.stderr


def _stop_orphans(session: int) -> None:
    """SIGKILL leaves the killed driver's local Ray cluster (same session id) running: end it, and wait until its
    processes are gone (zombies awaiting their reaper count as gone)."""
    try:
        os.killpg(session, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 60
    while _group_alive(session) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _group_alive(session), f"processes of session {session} outlived SIGKILL"


def _group_alive(group: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue  # the process ended while being read
        if int(fields[2]) == group and fields[0] not in ("Z", "X"):
            return True
    return False


@pytest.mark.cluster
def test_the_same_command_trains_on_two_nodes(ray_cluster, tmp_path, tokenizer_dir, vocab):
    """`cm3 train --ray-address` on the two-node loopback cluster: one FSDP worker per node (each node has one
    CPU), the run ends with its checkpoint exported."""
    shards = write_augmented_shards(tmp_path / "shards", vocab, shards=2, rows=16)
    command = train_command(shards, tokenizer_dir, tmp_path / "runs", "--steps", "4", "--checkpoint-every", "4",
                            "--num-workers", "2", "--cpus-per-worker", "1", "--ray-address", ray_cluster.address)
    done = subprocess.run(command, env={**os.environ, **RAY_ENV}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Ray cluster at {ray_cluster.address}" in done.stdout
    records = read_metrics(tmp_path / "runs" / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {(r["nodes"], r["world_size"]) for r in records} == {(2, 2)}
    assert (tmp_path / "runs" / "run" / "final" / "checkpoint.json").is_file()


def test_bad_inputs_fail_before_training_with_the_path_named(tmp_path, tokenizer_dir, vocab, pretrained):
    from cm3.tokenizers.multimodal import MultimodalTokenizer
    from cm3.tokenizers.text import TextTokenizer
    from cm3.workflows.train import run_training

    storage = pretrained.run_dir.parent
    before = {p: p.stat().st_mtime_ns for p in pretrained.run_dir.rglob("*")}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=str(empty)):
        run_training(options("pretrain", empty, storage, tokenizer=tokenizer_dir))

    broken = write_augmented_shards(tmp_path / "broken", vocab, shards=2)
    (broken / "00001.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"00001\.parquet: unreadable Parquet file"):
        run_training(options("pretrain", broken, storage, tokenizer=tokenizer_dir))

    with pytest.raises(FileNotFoundError, match="missing-init"):
        run_training(options("sft", broken, storage, init=tmp_path / "missing-init"))

    other = tmp_path / "other-tokenizer"
    loaded = MultimodalTokenizer.load(tokenizer_dir)
    MultimodalTokenizer(TextTokenizer.train(["some other words entirely"] * 50, vocab_size=280), loaded.vq).save(other)
    good = write_augmented_shards(tmp_path / "good", vocab, shards=1)
    with pytest.raises(ValueError, match="is not the tokenizer of --init"):
        run_training(options("sft", good, storage, init=pretrained.checkpoint, tokenizer=other))
    with pytest.raises(ValueError, match="vocab_size"):  # resuming the pretrain run with another vocabulary
        run_training(options("pretrain", good, storage, tokenizer=other))
    assert {p: p.stat().st_mtime_ns for p in pretrained.run_dir.rglob("*")} == before


def test_paths_handed_to_workers_are_absolute():
    """Ray workers run in their own folder: a relative --init or --shards would not be found there."""
    from cm3.workflows.train import TrainOptions, absolute_paths

    resolved = absolute_paths(TrainOptions(stage="sft", shards=Path("rel/shards"), init=Path("rel/init")))
    assert resolved.shards == Path.cwd() / "rel" / "shards" and resolved.init == Path.cwd() / "rel" / "init"
    assert resolved.storage.is_absolute() and resolved.tokenizer is None


def test_chameleon_sft_with_the_image_head_only(tmp_path, ray_local):
    """A converted (tiny) Chameleon, instruction-tuned on shards laid out in its own vocabulary: only the output
    head's image rows move; CM3's infilling objective is refused (Chameleon has no <mask:i>)."""
    from chameleon_models import hf_model, write_hf_folder, write_vqgan

    from cm3.model.chameleon import convert_chameleon
    from cm3.model.checkpoint import load_checkpoint
    from cm3.workflows.train import run_training

    write_vqgan(tmp_path / "vq.ckpt", tmp_path / "vq.yaml")
    convert_chameleon(write_hf_folder(hf_model(), tmp_path / "hf"), tmp_path / "init", vqgan=tmp_path / "vq.ckpt",
                      vqgan_config=tmp_path / "vq.yaml")
    init, tokenizer = load_checkpoint(tmp_path / "init")
    vocab = tokenizer.vocab
    rows = []
    for i in range(32):
        text, codes = tokenizer.encode_caption(f"shape {i % 4}"), [(i % 4 + k) % 64 for k in range(16)]
        rows.append({"ids": [vocab.bos, *vocab.join([(False, text), (True, vocab.image_ids(codes).tolist())]),
                             vocab.eos]})
    (tmp_path / "sft").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sft" / "00000.parquet")
    with pytest.raises(ValueError, match="--no-cm3"):
        run_training(options("sft", tmp_path / "sft", tmp_path / "runs", init=tmp_path / "init", seq_len=64))
    result = run_training(options("sft", tmp_path / "sft", tmp_path / "runs", init=tmp_path / "init", seq_len=64,
                                  cm3=False, trainable="image-head", steps=4, batch_tokens=4 * 64))
    tuned, _ = load_checkpoint(result.checkpoint)
    image = torch.from_numpy(vocab.image_id_table())
    text = torch.ones(vocab.size, dtype=torch.bool)
    text[image] = False
    assert torch.equal(tuned.lm_head.weight[text], init.lm_head.weight[text])
    assert not torch.equal(tuned.lm_head.weight[image], init.lm_head.weight[image])
    assert torch.equal(tuned.blocks[1].mlp.up.weight, init.blocks[1].mlp.up.weight)


def test_a_damaged_page_behind_an_intact_footer_is_named_and_not_retried(tmp_path, tokenizer_dir, vocab, ray_local):
    """Only a worker can find it (the driver reads footers): its InputError names the file, the retries Ray starts
    fail at once with it, and the driver raises it (exit 2 in the CLI)."""
    from cm3.core.errors import InputError
    from cm3.model.train_data import RankShards, shard_units
    from cm3.workflows.train import INPUT_ERROR_FILE, run_training

    shards = write_augmented_shards(tmp_path / "shards", vocab, shards=1, rows=16)
    damaged = shards / "00000.parquet"
    damage_a_page_header(damaged, "text_ids")
    assert pq.ParquetFile(damaged).metadata.num_rows == 16  # the footer is whole
    rows = RankShards(shard_units([str(damaged)], 1), ["text_ids", "image_ids"], seed=0).rows(epoch=0)
    with pytest.raises(InputError, match=rf"{damaged}: row group 0 cannot be read, the file is damaged"):
        next(rows)
    with pytest.raises(InputError, match=rf"{damaged}: row group 0 cannot be read"):
        run_training(options("pretrain", shards, tmp_path / "runs", tokenizer=tokenizer_dir, steps=2,
                             max_failures=2, retrieved_max=0, retrieved_min=0))
    assert not (tmp_path / "runs" / "run" / INPUT_ERROR_FILE).exists()
