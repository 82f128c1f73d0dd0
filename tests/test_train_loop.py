"""The plain-PyTorch training loop in one process (`LocalSession`, as under torchrun): it trains, logs MFU,
data wait and memory, writes a profiler trace, resumes bit-identically from its checkpoint; `cm3 train` takes
every default from `TrainOptions` and refuses bad parallelism options."""

from __future__ import annotations

import json
import shutil
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from cm3.model.train_loop import LocalSession, train
from cm3.model.train_metrics import DASHBOARD_METRICS, METRICS_FILE, read_metrics
from cm3.workflows.train import TrainOptions, plan_run
from factories import TRAIN_CAPTIONS, TRAIN_VQ, make_tokenizer, write_augmented_shards

SEQ = 128


def options(tmp_path: Path, **overrides) -> TrainOptions:
    return TrainOptions(**{**dict(
        stage="pretrain", shards=tmp_path / "shards", tokenizer=tmp_path / "tokenizer", storage=tmp_path / "runs",
        name="run", model_overrides={"n_layers": 2, "d_model": 64, "n_heads": 2}, seq_len=SEQ, batch_size=4,
        batch_tokens=2 * 4 * SEQ, steps=8, lr=3e-3, warmup_steps=2, retrieved_min=1, checkpoint_every=4,
        log_every=4), **overrides})


def test_the_loop_trains_logs_profiles_and_resumes_bit_identically(tmp_path, torch_one_thread, capsys):
    """One process, as under torchrun: `plan_run` makes the loop's config, `LocalSession` keeps checkpoints."""
    vocab = make_tokenizer(tmp_path / "tokenizer", TRAIN_VQ, TRAIN_CAPTIONS).vocab
    write_augmented_shards(tmp_path / "shards", vocab, shards=2, rows=24)
    loop, _ = plan_run(options(tmp_path, profile=2, activation_checkpointing="full"))
    assert loop.accumulation == 2 and loop.ac_every == 1
    run_dir = Path(loop.run_dir)
    train(loop, LocalSession(run_dir, keep=2))
    first = read_metrics(run_dir / METRICS_FILE)
    assert [r["step"] for r in first] == list(range(1, 9))
    assert first[-1]["loss"] < first[0]["loss"]
    assert set(DASHBOARD_METRICS) <= set(first[0])  # every dashboard gauge is fed from the record
    for record in first:
        assert 0 <= record["data_wait"] < 1 and record["memory_gib"] > 0 and record["mfu"] is None  # no CPU peak
        assert record["tokens_seen"] == record["step"] * 2 * 4 * SEQ and record["attention"] == "flash"
    console = capsys.readouterr().out
    assert "activation checkpointing every block" in console and "data wait" in console
    trace = json.loads((run_dir / "profile" / "rank0.json").read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}  # one skipped, one warm-up, then 2 traced
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == ["checkpoint_0000004", "checkpoint_0000008"]

    shutil.rmtree(run_dir / "checkpoint_0000008")  # as if killed after step 8 but before its checkpoint
    loop, _ = plan_run(options(tmp_path))  # and resumed without activation checkpointing
    train(loop, LocalSession(run_dir))
    again = read_metrics(run_dir / METRICS_FILE)
    assert [r["step"] for r in again] == list(range(1, 9)) and again[-1]["start_step"] == 4
    same = ("loss", "text_loss", "image_loss", "grad_norm", "tokens_seen", "epoch")
    assert [[r[k] for k in same] for r in again] == [[r[k] for k in same] for r in first]

    # a new run from those weights (as `--init` does) trains with its own schedule, not the saved one's
    loop, _ = plan_run(options(tmp_path, name="tuned", steps=3, lr=1e-4, warmup_steps=1))
    loop.init = str(run_dir / "checkpoint_0000004")
    train(loop, LocalSession(loop.run_dir))
    tuned = read_metrics(Path(loop.run_dir) / METRICS_FILE)
    assert [r["lr"] for r in tuned] == pytest.approx([1e-4, 1e-4, 5.5e-5])  # warm-up 1 step, then linear decay
    assert tuned[0]["loss"] < first[0]["loss"]  # it starts from the trained weights


def test_every_cli_default_is_the_options_default():
    import typer.main

    from cm3.workflows.cli import app
    from cm3.workflows.commands.train import OPTION_FIELDS

    command = typer.main.get_command(app).commands["train"]
    defaults = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
                for f in fields(TrainOptions)}
    checked = set()
    for param in command.params:
        name = OPTION_FIELDS.get(param.name, param.name)
        assert name in defaults, f"--{param.name} has no TrainOptions field"
        if param.required:
            continue
        if name == "model_overrides":  # --set KEY=VALUE pairs -> a dict
            assert list(param.default) == [] and defaults[name] == {}
        else:
            assert param.default == defaults[name], (param.name, param.default, defaults[name])
            assert type(param.default) is type(defaults[name]), param.name
        checked.add(name)
    assert checked | {"stage", "shards"} == set(defaults)


def test_bad_parallel_options_are_refused_before_anything_runs(tmp_path):
    from cm3.workflows.train import ac_every

    assert [ac_every(v) for v in ("none", "full", "3")] == [0, 1, 3]
    with pytest.raises(ValueError, match="--activation-checkpointing 'half'"):
        ac_every("half")
    with pytest.raises(ValueError, match="parallelism must be one of"):
        plan_run(TrainOptions(stage="pretrain", shards=tmp_path, parallelism="zero3"))
    with pytest.raises(ValueError, match="--parallelism none trains one worker, not 2"):
        plan_run(TrainOptions(stage="pretrain", shards=tmp_path, parallelism="none", num_workers=2))
