"""The shard commit protocol that every shard folder follows (raw, token, augmented and SFT task shards).

    DIR/00000.parquet         the shard's rows
    DIR/00000_stats.json      the stage's per-shard stats (img2dataset's for raw shards); written last
    DIR/_tmp/                 work in progress; never read

A shard is complete when its stats file exists. Each try at a shard writes into its own staging folder under
``_tmp`` and is committed file by file with ``replace_file`` (atomic on one file system), the parquet first and
the stats file last, so a killed run leaves either nothing, or a parquet without stats that the next run
rewrites: no half-written shard is ever taken as complete, and a rerun resumes shard by shard.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from cm3.core.errors import InputError
from cm3.core.files import replace_file
from cm3.core.intact import load_json

SHARD_DIGITS = 5  # img2dataset's oom_shard_count
TMP_DIR = "_tmp"


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
    replace_file(staged_parquet, parquet_path(out_dir, shard_id))
    replace_file(staged_stats, stats_path(out_dir, shard_id))
    shutil.rmtree(attempt_dir, ignore_errors=True)


def clear_staging(out_dir: Path) -> None:
    """Drop what killed runs left in ``_tmp``; nothing there was ever complete."""
    shutil.rmtree(out_dir / TMP_DIR, ignore_errors=True)


def read_stats(out_dir: Path, shard_id: int) -> dict:
    """A shard's stats; InputError naming the file when it is not a JSON object (damaged, or not a stats file)."""
    path = stats_path(out_dir, shard_id)
    stats = load_json(path)
    if not isinstance(stats, dict):
        raise InputError(f"{path}: expected a JSON object (a shard's stats), found {type(stats).__name__}")
    return stats


# What each stage leaves in its output folder and no other stage writes, so a stage pointed at another's folder
# refuses it by name instead of mixing its files in (the names are the stages' own constants: tests check them).
STAGE_MARKERS = {
    "ingest_config.json": "raw shards of cm3 ingest",
    "tokenize_config.json": "token shards of cm3 tokenize",
    "faiss": "an index of cm3 build-index",
    "build_report.json": "an index of cm3 build-index",
    "checkpoint.json": "a cm3 checkpoint",
    "vocabulary.json": "a cm3 tokenizer",
    "metrics.jsonl": "a cm3 train run",
}


def foreign_output(folder: Path, own: tuple[str, ...] = (), shards_need_own: bool = False) -> str | None:
    """What another stage left in ``folder`` (e.g. "token shards of cm3 tokenize (tokenize_config.json)"), or None.
    ``own``: the markers the asking stage writes itself; with ``shards_need_own``, shards in a folder without
    them are another stage's too."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for name, what in STAGE_MARKERS.items():
        if name not in own and (folder / name).exists():
            return f"{what} ({name})"
    if shards_need_own and not any((folder / name).exists() for name in own):
        shards = sorted(folder.glob(f"{'[0-9]' * SHARD_DIGITS}*.parquet"))
        if shards:
            return f"shards that another stage wrote ({shards[0].name}, and no {' or '.join(own)})"
    return None
