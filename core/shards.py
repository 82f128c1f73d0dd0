"""The raw-shard folder on disk: names, atomic commits, and which shards are complete.

Layout of ``cm3 ingest --out DIR`` (img2dataset's parquet layout, plus a commit rule):

    DIR/00000.parquet         one row per input URL: key, url, caption, txt, jpg (bytes, null on failure),
                              status, error_message, width, height, original_width, original_height, sha256
    DIR/00000_stats.json      img2dataset's per-shard stats (count, successes, status_dict, ...)
    DIR/ingest_config.json    what produced the folder (input fingerprint, shard size, resize settings)
    DIR/ingest_summary.json   totals over every complete shard (success rate, failures by reason, images/s)
    DIR/_tmp/                 work in progress; never read

A shard is complete when its stats file exists. Each file reaches its final name by
``os.replace`` from ``_tmp`` (atomic on one file system), the parquet first and the stats file
last, so a killed run leaves either nothing, or a parquet without stats that the next run
rewrites: no half-written shard is ever taken as complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

SHARD_DIGITS = 5  # img2dataset's oom_shard_count
TMP_DIR = "_tmp"
CONFIG_FILE = "ingest_config.json"
SUMMARY_FILE = "ingest_summary.json"


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def parquet_path(out_dir: Path, shard_id: int) -> Path:
    return out_dir / f"{shard_name(shard_id)}.parquet"


def stats_path(out_dir: Path, shard_id: int) -> Path:
    return out_dir / f"{shard_name(shard_id)}_stats.json"


def complete_shards(out_dir: Path) -> list[int]:
    """Ids of the shards whose parquet and stats file are both in place."""
    done = []
    for stats in out_dir.glob(f"{'[0-9]' * SHARD_DIGITS}_stats.json"):
        shard_id = int(stats.name.split("_")[0])
        if parquet_path(out_dir, shard_id).exists():
            done.append(shard_id)
    return sorted(done)


def new_attempt_dir(out_dir: Path, shard_id: int) -> Path:
    """A private staging folder for one try at one shard (tries never share files)."""
    path = out_dir / TMP_DIR / f"{shard_name(shard_id)}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def commit_shard(attempt_dir: Path, out_dir: Path, shard_id: int) -> None:
    """Move a finished shard from its staging folder to its final names: parquet, then stats."""
    staged_parquet = attempt_dir / parquet_path(out_dir, shard_id).name
    staged_stats = attempt_dir / stats_path(out_dir, shard_id).name
    for staged in (staged_parquet, staged_stats):
        if not staged.exists():
            raise FileNotFoundError(f"shard {shard_name(shard_id)}: {staged.name} was not written")
        _fsync(staged)
    os.replace(staged_parquet, parquet_path(out_dir, shard_id))
    os.replace(staged_stats, stats_path(out_dir, shard_id))
    _fsync_dir(out_dir)
    shutil.rmtree(attempt_dir, ignore_errors=True)


def clear_staging(out_dir: Path) -> None:
    """Drop what killed runs left in ``_tmp``; nothing there was ever complete."""
    shutil.rmtree(out_dir / TMP_DIR, ignore_errors=True)


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_stats(out_dir: Path, shard_id: int) -> dict:
    return read_json(stats_path(out_dir, shard_id))


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON so that readers see the old file or the new one, never a prefix."""
    staged = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(staged, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staged, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # some file systems do not allow fsync on a directory
        pass
