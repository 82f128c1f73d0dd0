"""Issue #22, parts 3-5: every stage checks what it reuses, damaged files are named, a resumed run takes the newest
complete checkpoint. Each case runs the `cm3` command a user would (exit code 2, the file or folder named in the
message) and checks that the input folders did not change and nothing was written; each fails before Ray starts.
"""

from __future__ import annotations

import hashlib
import re
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cm3.core.errors import InputError
from conftest import cm3, free_port
from factories import (TRAIN_CAPTIONS, TRAIN_VQ, damage_a_page_header, make_tokenizer, save_tiny_checkpoint,
                       write_augmented_shards, write_raw_shards, write_token_shards)


def tree_hash(*folders: Path) -> str:
    """Every file's relative path and bytes, and every folder's name, under the given folders."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            digest.update(str(path.relative_to(folder)).encode())
            if path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def failed(proc, *names: str) -> bool:
    return proc.returncode == 2 and all(name in proc.stderr for name in names) and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> tuple[Path, Path]:
    """The training tests' tokenizer and another one (other BPE merges, the same VQ-GAN)."""
    root = tmp_path_factory.mktemp("tokenizers")
    make_tokenizer(root / "ours", TRAIN_VQ, TRAIN_CAPTIONS)
    make_tokenizer(root / "theirs", TRAIN_VQ, [c.replace("circle", "ring") for c in TRAIN_CAPTIONS])
    return root / "ours", root / "theirs"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizers) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", tokenizers[0])


def url_list(folder: Path) -> Path:
    path = folder / "urls.txt"
    path.write_text("http://127.0.0.1:9/a.jpg\nhttp://127.0.0.1:9/b.jpg\n")
    return path


# Part 3: every stage checks what it reuses


def test_ingest_refuses_an_out_folder_that_another_stage_wrote(tmp_path, tokenizers):
    tokens = write_token_shards(tmp_path / "tokens", tokenizers[0])
    index = tmp_path / "index"
    (index / "faiss").mkdir(parents=True)
    (index / "build_report.json").write_text("{}")
    urls = url_list(tmp_path)
    before = tree_hash(tokens, index)
    for folder, owner in ((tokens, "token shards of cm3 tokenize"), (index, "an index of cm3 build-index"),
                          (tokenizers[0], "a cm3 tokenizer")):
        proc = cm3("ingest", str(urls), "--out", str(folder), "--no-progress")
        assert failed(proc, str(folder), owner), proc.stderr
        assert "Ray" not in proc.stdout  # refused before a cluster was started or joined
    assert tree_hash(tokens, index) == before
    assert not (tokens / "ingest_config.json").exists() and not (tokens / "ingest_summary.json").exists()

    # shards without any stage's marker are not raw shards either
    loose = tmp_path / "loose"
    loose.mkdir()
    pq.write_table(pa.table({"ids": [[1, 2]]}), loose / "00000.parquet")
    proc = cm3("ingest", str(urls), "--out", str(loose), "--no-progress")
    assert failed(proc, str(loose), "00000.parquet"), proc.stderr
    assert sorted(p.name for p in loose.iterdir()) == ["00000.parquet"]


def test_tokenize_refuses_an_out_folder_of_raw_shards(tmp_path, tokenizers):
    raw = tmp_path / "raw"
    write_raw_shards(raw, shards=1, rows=2)
    other = tmp_path / "other_raw"
    write_raw_shards(other, shards=1, rows=2)
    (other / "ingest_config.json").write_text("{}")
    before = tree_hash(raw, other)
    proc = cm3("tokenize", str(raw), "--out", str(other), "--tokenizer", str(tokenizers[0]), "--no-progress")
    assert failed(proc, str(other), "raw shards of cm3 ingest"), proc.stderr
    assert tree_hash(raw, other) == before


def test_build_index_refuses_an_out_folder_of_token_shards_or_of_another_tokenizer(tmp_path, tokenizers):
    clip = {"model_name": "cm3-clip-tiny", "pretrained": str(tmp_path / "clip.safetensors")}
    tokens = write_token_shards(tmp_path / "tokens", tokenizers[0], clip=clip)
    theirs = write_token_shards(tmp_path / "theirs", tokenizers[1], clip=clip)
    augmented = tmp_path / "augmented"  # augmented shards that build-index made from the other tokenizer's shards
    write_augmented_shards(augmented, _vocab(tokenizers[1]), shards=1, rows=4)
    sha = json.loads((theirs / "tokenize_config.json").read_text())["tokenizer_sha256"]
    (augmented / "00000_stats.json").write_text(json.dumps({"count": 4, "kept": 4, "tokenizer_sha256": sha}))
    before = tree_hash(tokens, theirs, augmented)
    for out, named in ((theirs, "token shards of cm3 tokenize"), (augmented, sha[:12])):
        proc = cm3("build-index", str(tokens), "--index", str(tmp_path / "index"), "--out", str(out),
                   "--no-progress")
        assert failed(proc, str(out), named), proc.stderr
    assert tree_hash(tokens, theirs, augmented) == before and not (tmp_path / "index").exists()


def _vocab(tokenizer_dir: Path):
    from cm3.tokenizers.multimodal import MultimodalTokenizer

    return MultimodalTokenizer.load(tokenizer_dir).vocab


def test_train_refuses_token_shards_of_another_tokenizer_before_ray(tmp_path, tokenizers, checkpoint):
    ours, theirs = tokenizers
    shards = write_token_shards(tmp_path / "tokens", theirs)
    sha = json.loads((shards / "tokenize_config.json").read_text())["tokenizer_content_sha256"]
    before = tree_hash(shards)
    common = ["train", "--stage", "pretrain", "--shards", str(shards), "--storage", str(tmp_path / "runs"),
              "--retrieved-max", "0", "--retrieved-min", "0", "--steps", "1"]
    proc = cm3(*common, "--tokenizer", str(ours))
    assert failed(proc, str(shards), sha[:12], str(ours), "tokenize_config.json"), proc.stderr
    proc = cm3(*common, "--init", str(checkpoint))  # the checkpoint carries `ours`
    assert failed(proc, str(shards), sha[:12], "the tokenizer of --init"), proc.stderr
    proc = cm3(*common, "--init", str(checkpoint), "--tokenizer", str(theirs))  # two tokenizers at once
    assert failed(proc, str(theirs), str(checkpoint)), proc.stderr
    assert tree_hash(shards) == before and not (tmp_path / "runs").exists()

    from cm3.workflows.train import TrainOptions, plan_run  # the same shards with their own tokenizer are fine

    loop, _ = plan_run(TrainOptions(stage="pretrain", shards=shards, storage=tmp_path / "runs", tokenizer=theirs,
                                    retrieved_min=0, retrieved_max=0, steps=1,
                                    model_overrides={"n_layers": 1, "d_model": 32, "n_heads": 2}))
    assert loop.columns == ["text_ids", "image_ids"]


def test_augmented_shards_record_their_tokenizer_and_two_tokenizers_in_one_folder_are_refused(tmp_path, tokenizers):
    from cm3.pipeline.tokenize import check_made_with, recorded_tokenizer, tokenizer_fingerprint

    ours, theirs = (tokenizer_fingerprint(t) for t in tokenizers)
    folder = write_augmented_shards(tmp_path / "augmented", _vocab(tokenizers[0]), shards=2, rows=4)
    assert recorded_tokenizer(folder) is None  # shards written by hand record none: nothing to check
    (folder / "00000_stats.json").write_text(json.dumps({"tokenizer_sha256": ours}))
    assert recorded_tokenizer(folder) == ({"tokenizer_sha256": ours}, folder / "00000_stats.json")
    check_made_with(folder, tokenizers[0], "--tokenizer")
    with pytest.raises(InputError, match=f"{theirs[:12]}.*{ours[:12]}|{ours[:12]}.*{theirs[:12]}"):
        check_made_with(folder, tokenizers[1], "--tokenizer")
    (folder / "00001_stats.json").write_text(json.dumps({"tokenizer_sha256": theirs}))
    with pytest.raises(InputError, match="two tokenizers"):
        recorded_tokenizer(folder)


def test_a_checkpoints_copy_of_the_tokenizer_matches_its_source_with_a_marker_beside_it(tmp_path, tokenizers):
    """The demo leaves a `.done` marker in its tokenizer folder; the checkpoint trained with it carries a copy
    without one: continuing to train it (--init) on the shards that folder made is not a mismatch."""
    import shutil

    from cm3.workflows.train import TrainOptions, plan_run

    source = tmp_path / "tokenizer"
    shutil.copytree(tokenizers[0], source)
    (source / ".done").write_text('{"finished": 1}')
    shards = write_token_shards(tmp_path / "tokens", source)
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", source)
    for tokenizer in (None, source):
        plan_run(TrainOptions(stage="pretrain", shards=shards, storage=tmp_path / "runs", init=checkpoint,
                              tokenizer=tokenizer, retrieved_min=0, retrieved_max=0, steps=1))
    (source / "vocabulary.json").write_text((source / "vocabulary.json").read_text() + " ")  # content changed
    with pytest.raises(InputError, match="is not the tokenizer of --init"):
        plan_run(TrainOptions(stage="pretrain", shards=shards, storage=tmp_path / "runs", init=checkpoint,
                              tokenizer=source, retrieved_min=0, retrieved_max=0, steps=1))
    assert not (tmp_path / "runs").exists()


def test_stage_markers_are_the_stages_own_file_names():
    from cm3.core.shards import STAGE_MARKERS
    from cm3.index import build
    from cm3.model import checkpoint, train_metrics
    from cm3.pipeline import download, tokenize
    from cm3.tokenizers import multimodal

    assert set(STAGE_MARKERS) == {download.CONFIG_FILE, tokenize.CONFIG_FILE, build.FAISS_DIR, build.REPORT_FILE,
                                  checkpoint.MARKER, multimodal.VOCAB_FILE, train_metrics.METRICS_FILE}


# Part 4: damaged files are named


def test_tokenize_names_a_truncated_raw_shard(tmp_path, tokenizers):
    raw = tmp_path / "raw"
    write_raw_shards(raw, shards=2, rows=2)
    truncate(raw / "00001.parquet")
    before = tree_hash(raw)
    proc = cm3("tokenize", str(raw), "--out", str(tmp_path / "tokens"), "--tokenizer", str(tokenizers[0]),
               "--no-progress")
    assert failed(proc, str(raw / "00001.parquet"), "unreadable Parquet file"), proc.stderr
    assert tree_hash(raw) == before and not (tmp_path / "tokens").exists()


def test_tokenize_names_a_raw_shard_with_a_damaged_page_behind_an_intact_footer(tmp_path, tokenizers):
    """The driver's footer check passes; the read in a Ray Data worker fails. The error names the file and
    nothing half-written stays."""
    raw, tokens = tmp_path / "raw", tmp_path / "tokens"
    write_raw_shards(raw, shards=2, rows=2)
    damage_a_page_header(raw / "00001.parquet", "jpg")
    assert pq.ParquetFile(raw / "00001.parquet").metadata.num_rows == 2  # the footer is whole
    before = tree_hash(raw)
    proc = cm3("tokenize", str(raw), "--out", str(tokens), "--tokenizer", str(tokenizers[0]), "--no-progress")
    # Ray's own log shows the read task's traceback above it; the command's last word is the error naming the file
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith(f"error: {raw / '00001.parquet'}: row group 0 cannot be read"), \
        proc.stderr
    assert tree_hash(raw) == before
    assert not (tokens / "00001.parquet").exists() and not list(tokens.glob("**/*.partial*"))


def test_build_index_names_a_truncated_token_shard_and_writes_nothing(tmp_path, tokenizers):
    clip = {"model_name": "cm3-clip-tiny", "pretrained": str(tmp_path / "clip.safetensors")}
    tokens = write_token_shards(tmp_path / "tokens", tokenizers[0], clip=clip)
    truncate(tokens / "00001.parquet", keep=0.9)
    before = tree_hash(tokens)
    proc = cm3("build-index", str(tokens), "--index", str(tmp_path / "index"), "--out", str(tmp_path / "aug"),
               "--no-progress")
    assert failed(proc, str(tokens / "00001.parquet"), "unreadable Parquet file"), proc.stderr
    assert tree_hash(tokens) == before and sorted(p.name for p in tmp_path.iterdir()) == ["tokens"]


DAMAGE = {  # file of a checkpoint -> (damage, what the message says)
    "model.safetensors": (truncate, "truncated"),
    "config.json": (lambda path: path.write_text('{"n_layers": 1,'), "not valid JSON"),
    "tokenizer/vq/model.safetensors": (truncate, "truncated"),
}


@pytest.mark.parametrize("name", DAMAGE)
def test_generate_serve_and_train_init_name_a_damaged_checkpoint_file(tmp_path, tokenizers, checkpoint, name):
    import shutil

    shards = write_token_shards(tmp_path / "tokens", tokenizers[0])
    damage, message = DAMAGE[name]
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    damage(broken / name)
    before = tree_hash(broken, shards)
    proc = cm3("generate", "a red circle", "--checkpoint", str(broken), "--out", str(tmp_path / "out.png"))
    assert failed(proc, str(broken / name), message), proc.stderr
    # refused in the driver, before Ray starts: a replica that failed to load would be restarted by Ray Serve
    proc = cm3("serve", str(broken), "--port", str(free_port()), timeout=120)
    assert failed(proc, str(broken / name), message), proc.stderr
    proc = cm3("train", "--stage", "pretrain", "--shards", str(shards), "--init", str(broken), "--storage",
               str(tmp_path / "runs"), "--retrieved-max", "0", "--retrieved-min", "0", "--steps", "1")
    assert failed(proc, str(broken / name), message), proc.stderr
    assert tree_hash(broken, shards) == before
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out.png").exists()


def test_the_cheap_checks_find_truncation_and_name_the_file(tmp_path):
    from safetensors.torch import save_file
    import torch

    from cm3.core.intact import load_json, parquet_metadata, safetensors_header

    weights = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(64), "b": torch.ones(3, 5)}, str(weights))
    assert set(safetensors_header(weights)) == {"a", "b"}
    whole = weights.read_bytes()
    for data, message in ((whole[:-1], "truncated"), (whole + b"\0", "longer than its header says"),
                          (whole[:5], "truncated or empty"), (b"\xff" * 64, "not a safetensors file or truncated"),
                          (len(b"[1]").to_bytes(8, "little") + b"[1]", "not a JSON object")):
        weights.write_bytes(data)
        with pytest.raises(InputError, match=f"{weights}: .*{message}"):
            safetensors_header(weights)

    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": list(range(100))}), table)
    assert parquet_metadata(table).num_rows == 100
    truncate(table, keep=0.99)
    with pytest.raises(InputError, match=f"{table}: unreadable Parquet file"):
        parquet_metadata(table)
    with pytest.raises(InputError, match="file not found"):
        parquet_metadata(tmp_path / "missing.parquet")

    config = tmp_path / "c.json"
    for data in (b'{"a": ', b"\xff\xfe", b""):
        config.write_bytes(data)
        with pytest.raises(InputError, match=f"{config}: not valid JSON"):
            load_json(config)


# Part 5: a resumed run takes the newest complete checkpoint


def test_resume_takes_the_newest_complete_checkpoint_on_disk(tmp_path):
    import torch

    from cm3.model.config import CM3Config
    from cm3.model.decoder import CM3
    from cm3.model.train_checkpoint import (TrainState, checkpoint_name, latest_checkpoint, resume_from,
                                            save_train_checkpoint)

    config = CM3Config.from_preset("tiny", vocab_size=64, n_layers=1, d_model=16, n_heads=2, max_seq_len=32)
    model = CM3(config)
    optimizer = torch.optim.AdamW(model.parameters())
    run = tmp_path / "run"
    for step in (3, 6, 9, 12, 15):
        state = TrainState(step=step, tokens_seen=step * 10, positions=[], seed=0, config={})
        save_train_checkpoint(run / checkpoint_name(step), model.state_dict(), optimizer.state_dict(), config, state)
    # a killed copy: 12's weights cut short, 15 without its optimizer state (train_state.json is in both)
    truncate(run / checkpoint_name(12) / "model.safetensors")
    (run / checkpoint_name(15) / "optimizer.pt").unlink()
    (run / checkpoint_name(18)).mkdir()  # begun, nothing committed
    newest = run / checkpoint_name(9)
    assert latest_checkpoint(run) == newest
    assert resume_from(run / checkpoint_name(3), run) == newest  # Ray registered 3; 6 and 9 are on disk
    assert resume_from(None, run) == newest  # Ray's record of the run was lost
    assert resume_from(newest, run) == newest
    assert resume_from(run / checkpoint_name(3), tmp_path / "empty") == run / checkpoint_name(3)
    assert TrainState.read(newest).step == 9


def test_eval_reference_names_never_leave_the_images_folder(tmp_path):
    """`cm3 eval caption` / `vqa` look images up by the names in a reference file (data): a name leading out of
    --images, by ../, an absolute path or a link, is refused by name and never opened."""
    from cm3.evaluation.sources import NamedImages
    from cm3.synthetic.shapes import render, spec_for

    images = tmp_path / "images"
    images.mkdir()
    render(spec_for(0), 32).save(images / "a.png")
    secret = tmp_path / "secret.png"
    render(spec_for(1), 32).save(secret)
    (images / "alias.png").symlink_to(secret)
    named = NamedImages(images)
    assert named.pixels("a.png", 32).shape == (32, 32, 3)
    for name in ("../secret.png", str(secret), "alias.png", "sub/../../secret.png"):
        with pytest.raises(InputError, match=f"the image name {re.escape(repr(name))} leads outside the folder"):
            named.pixels(name, 32)
    with pytest.raises(InputError, match="no such image file"):
        named.pixels("missing\x00.png", 32)


def test_sft_task_shards_record_their_tokenizer_for_train_and_for_a_resume(tmp_path, tokenizers, checkpoint):
    """`cm3 sft demo` (as `cm3 sft convert`) records the tokenizer in each shard's stats: training them from a
    checkpoint with another tokenizer, or adding to the folder with another one, is refused."""
    from cm3.pipeline.tokenize import tokenizer_fingerprint

    ours, theirs = tokenizers
    sft = tmp_path / "sft"
    cm3("sft", "demo", "--tokenizer", str(theirs), "--out", str(sft), "--n", "1", "--shard-rows", "4", check=True)
    stats = json.loads((sft / "00000_stats.json").read_text())
    assert stats["tokenizer_content_sha256"] == tokenizer_fingerprint(theirs, content_only=True)
    before = tree_hash(sft)
    proc = cm3("train", "--stage", "sft", "--shards", str(sft), "--init", str(checkpoint), "--storage",
               str(tmp_path / "runs"), "--steps", "1")
    assert failed(proc, str(sft), tokenizer_fingerprint(theirs, content_only=True)[:12], "00000_stats.json",
                  "the tokenizer of --init"), proc.stderr
    assert tree_hash(sft) == before and not (tmp_path / "runs").exists()
    (sft / "00001_stats.json").unlink()  # as if killed before the second shard: a resume with another tokenizer
    before = tree_hash(sft)
    proc = cm3("sft", "demo", "--tokenizer", str(ours), "--out", str(sft), "--n", "1", "--shard-rows", "4")
    assert failed(proc, str(sft / "00000_stats.json"), "made with tokenizer"), proc.stderr
    assert tree_hash(sft) == before


def test_the_local_ray_cluster_of_a_killed_driver_is_stopped(tmp_path):
    """A driver that started a local Ray cluster is killed with SIGKILL: the watchdog stops that cluster's
    processes (and a Ray worker's), found by the token in their environment, and nothing else."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from cm3.workflows.ray_watchdog import tagged

    code = ("import os, signal, ray\n"
            "from cm3.workflows.ray_session import connect\n"
            "connect(None, num_cpus=1, quiet=True, dashboard=False)\n"
            "print(ray.get(ray.remote(lambda: os.environ.get('CM3_RAY_OWNER')).remote()), flush=True)\n"
            "print(os.environ.get('CM3_RAY_OWNER'), flush=True)\n"
            "signal.pause()\n")
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    token, in_driver = driver.stdout.readline().strip(), driver.stdout.readline().strip()
    assert len(token) == 32 and in_driver == "None"  # a worker carries it; what the driver starts later does not
    assert len(tagged(token)) >= 3  # GCS, raylet, the worker, ...
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 60
    while tagged(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tagged(token) == []
