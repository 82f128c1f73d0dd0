"""The download stage of ``cm3 ingest``: img2dataset's downloader, one Ray task per shard.

img2dataset's own Ray distributor submits every shard at once (no back-pressure), never retries
a failed shard, reads the whole URL list first and writes shards in place. This module keeps
img2dataset's ``Downloader``/``Resizer``/``ParquetSampleWriter`` (so shards have its schema and
stats) and changes the orchestration around them:

- the URL list is streamed chunk by chunk, and at most ``processes`` shards are in flight;
- each try of a shard writes into its own staging folder and is committed atomically
  (``commit_shard``), so a rerun after a kill skips exactly the complete shards;
- Ray retries a failed shard task (``DownloadSettings.max_shard_retry``), and ``retry_failed`` re-downloads only
  the rows that failed in complete shards, rewriting those shards in place atomically.

Raw-shard folder of ``cm3 ingest --out DIR`` (img2dataset's parquet layout, committed as ``cm3.core.shards`` says):

    DIR/00000.parquet         one row per input URL: key, url, caption, txt, jpg (bytes, null on failure),
                              status, error_message, width, height, original_width, original_height, sha256
    DIR/00000_stats.json      img2dataset's per-shard stats (count, successes, status_dict, ...)
    DIR/ingest_config.json    what produced the folder (input fingerprint, shard size, resize settings)
    DIR/ingest_summary.json   totals over every complete shard (success rate, failures by reason, images/s)
    DIR/_tmp/                 work in progress; never read
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from cm3.core.errors import InputError
from cm3.core.files import write_json
from cm3.core.intact import load_json
from cm3.core.shards import (
    SHARD_DIGITS,
    clear_staging,
    commit_shard,
    complete_shards,
    foreign_output,
    new_attempt_dir,
    parquet_path,
    read_stats,
    shard_name,
    stats_path,
)
from cm3.pipeline.image_checks import GuardedResizer
from cm3.pipeline.summary import summarise
from cm3.pipeline.url_list import UrlListSpec, iter_chunks
from cm3.pipeline.url_schemes import install_http_only_opener

COLUMNS = ["caption", "url"]  # the order img2dataset's reader hands columns to its downloader
CONFIG_FILE = "ingest_config.json"
SUMMARY_FILE = "ingest_summary.json"


@dataclass(frozen=True)
class DownloadSettings:
    """How ``cm3 ingest`` downloads (the command's defaults come from here); ``content_key`` names the settings
    that decide what a shard contains, which ``ingest_config.json`` keeps so a resume cannot mix them."""

    shard_rows: int = 10_000
    image_size: int = 256
    resize_mode: str = "center_crop"  # what a 256x256 VQ tokenizer wants (img2dataset's default is "border")
    encode_format: str = "jpg"
    encode_quality: int = 95
    max_image_area: float = 8192 * 8192  # checked from the header, before decoding
    timeout: float = 10.0
    retries: int = 0  # per-URL retries inside a shard
    thread_count: int = 64
    extract_exif: bool = False
    compute_hash: str | None = "sha256"
    cpus_per_task: float = 1.0  # Ray CPUs reserved by each shard task
    max_shard_retry: int = 1  # times Ray re-runs a shard task that failed

    def content_key(self) -> dict:
        """The settings a resumed run must share with the run that started the folder."""
        keys = ("shard_rows", "image_size", "resize_mode", "encode_format", "encode_quality", "max_image_area")
        return {name: getattr(self, name) for name in keys}


@dataclass
class IngestResult:
    summary: dict
    shards_written: list[int] = field(default_factory=list)
    shards_retried: list[int] = field(default_factory=list)
    shards_failed: dict[int, str] = field(default_factory=dict)


def _oom_sample_per_shard(settings: DownloadSettings) -> int:
    return math.ceil(math.log10(settings.shard_rows)) if settings.shard_rows > 1 else 1


def _make_downloader(settings: DownloadSettings, output_folder: Path):
    """img2dataset's downloader; imported here, in the Ray worker, so the driver never pays for
    img2dataset's imports (torch, wandb, albumentations: seconds per command). The worker's urllib fetches
    http and https only (``cm3.pipeline.url_schemes``)."""
    install_http_only_opener()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import ParquetSampleWriter

    resizer = Resizer(
        image_size=settings.image_size,
        resize_mode=settings.resize_mode,
        resize_only_if_bigger=False,
        encode_format=settings.encode_format,
        encode_quality=settings.encode_quality,
        max_image_area=settings.max_image_area,
    )
    return Downloader(
        sample_writer_class=ParquetSampleWriter,
        resizer=GuardedResizer(resizer, settings.max_image_area),
        thread_count=settings.thread_count,
        save_caption=True,
        extract_exif=settings.extract_exif,
        output_folder=str(output_folder),
        column_list=COLUMNS,
        timeout=settings.timeout,
        number_sample_per_shard=settings.shard_rows,
        oom_shard_count=SHARD_DIGITS,
        compute_hash=settings.compute_hash,
        verify_hash_type=None,
        encode_format=settings.encode_format,
        retries=settings.retries,
        user_agent_token=None,
        disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
    )


def _download_into(attempt_dir: Path, shard_id: int, table: pa.Table, settings: DownloadSettings) -> None:
    """Run img2dataset's downloader on one shard's rows; its parquet and stats land in attempt_dir."""
    staged_input = attempt_dir / "input.feather"
    table = table.select(COLUMNS)
    with pa.OSFile(str(staged_input), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    ok, _ = _make_downloader(settings, attempt_dir)((shard_id, str(staged_input)))
    if not ok:
        raise RuntimeError(f"shard {shard_name(shard_id)}: img2dataset's downloader failed (see logs)")


def download_shard(out_dir: str, shard_id: int, table: pa.Table, settings: DownloadSettings) -> dict:
    """Download one shard into staging and commit it; returns its stats."""
    out = Path(out_dir)
    attempt_dir = new_attempt_dir(out, shard_id)
    _download_into(attempt_dir, shard_id, table, settings)
    commit_shard(attempt_dir, out, shard_id)
    return {**read_stats(out, shard_id), "node_id": _node_id()}


def _node_id() -> str:
    """The Ray node a shard task ran on (ray is imported here, in the worker: the command line reads
    ``DownloadSettings`` at start-up and must not pay for importing ray)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def retry_failed_rows(out_dir: str, shard_id: int, settings: DownloadSettings) -> dict:
    """Re-download only the failed rows of a complete shard, then replace the shard atomically.

    Rows keep their keys and order; a row that fails again keeps its newest error message.
    """
    out = Path(out_dir)
    original = pq.read_table(parquet_path(out, shard_id))
    statuses = original.column("status").to_pylist()
    failed_rows = [i for i, status in enumerate(statuses) if status != "success"]
    if not failed_rows:
        return {**read_stats(out, shard_id), "node_id": _node_id()}
    attempt_dir = new_attempt_dir(out, shard_id)
    started = time.time()
    _download_into(attempt_dir, shard_id, original.take(failed_rows), settings)
    retried = pq.read_table(attempt_dir / parquet_path(out, shard_id).name).cast(original.schema)

    # img2dataset keys a row by its position in the table it was given: map back to the original rows.
    from img2dataset.downloader import compute_key

    digits = _oom_sample_per_shard(settings)
    position_of_key = {
        compute_key(i, shard_id, digits, SHARD_DIGITS): row for i, row in enumerate(failed_rows)
    }
    replacement = {position_of_key[key]: i for i, key in enumerate(retried.column("key").to_pylist())}
    both = pa.concat_tables([original, retried])
    merged = both.take([original.num_rows + replacement[i] if i in replacement else i
                        for i in range(original.num_rows)])
    merged = merged.set_column(merged.schema.get_field_index("key"), "key", original.column("key"))

    shard_file = attempt_dir / parquet_path(out, shard_id).name
    pq.write_table(merged, shard_file)
    previous = read_stats(out, shard_id)
    stats = _stats_from_table(merged, started, previous)
    write_json(attempt_dir / stats_path(out, shard_id).name, stats)
    commit_shard(attempt_dir, out, shard_id)
    return {**stats, "node_id": _node_id()}


def _stats_from_table(table: pa.Table, started: float, previous: dict) -> dict:
    """img2dataset's stats format, recomputed from a shard's rows after a retry."""
    statuses = table.column("status").to_pylist()
    messages = table.column("error_message").to_pylist()
    status_dict = Counter("success" if s == "success" else (m or s or "unknown") for s, m in zip(statuses, messages))
    return {
        "count": len(statuses),
        "successes": statuses.count("success"),
        "failed_to_download": statuses.count("failed_to_download"),
        "failed_to_resize": statuses.count("failed_to_resize"),
        "duration": previous.get("duration", 0.0) + time.time() - started,
        "start_time": previous.get("start_time", started),
        "end_time": time.time(),
        "status_dict": dict(status_dict),
        "retries_of_failed_rows": previous.get("retries_of_failed_rows", 0) + 1,
    }


def _folder_config(spec: UrlListSpec, settings: DownloadSettings) -> dict:
    return {"input": spec.fingerprint(), "settings": settings.content_key()}


def check_output_folder(out_dir: Path, spec: UrlListSpec, settings: DownloadSettings) -> None:
    """Refuse, before any work, a folder that holds shards from another input or other settings."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    if (other := foreign_output(out_dir, (CONFIG_FILE,), shards_need_own=True)) is not None:
        raise InputError(f"{out_dir}: holds {other}, not raw shards of cm3 ingest; --out must be a new folder or "
                         "one that cm3 ingest wrote")
    path = out_dir / CONFIG_FILE
    if not path.exists():
        return
    previous, config = load_json(path), _folder_config(spec, settings)
    if not isinstance(previous, dict):
        raise InputError(f"{path}: expected a JSON object (the folder's input and settings)")
    changed = sorted(
        f"{part}.{key}"
        for part in config
        for key in set(config[part]) | set(previous.get(part, {}))
        if config[part].get(key) != previous.get(part, {}).get(key)
    )
    if changed:
        raise InputError(
            f"{out_dir}: holds shards from another input or settings (differs in: {', '.join(changed)}); "
            "resume needs the same URL list and shard settings: choose another --out or remove the folder"
        )


def run_download(
    spec: UrlListSpec,
    out_dir: Path,
    settings: DownloadSettings,
    *,
    processes: int,
    retry_failed: bool = False,
    progress: bool = True,
) -> IngestResult:
    """Download every shard of ``spec`` not yet complete in ``out_dir`` on the connected Ray cluster."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("run_download needs a Ray connection (cm3.workflows.ray_session.connect)")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    check_output_folder(out_dir, spec, settings)
    write_json(out_dir / CONFIG_FILE, _folder_config(spec, settings))
    clear_staging(out_dir)
    done = set(complete_shards(out_dir))
    task_options = dict(num_cpus=settings.cpus_per_task, max_retries=settings.max_shard_retry, retry_exceptions=True)
    download_task = ray.remote(download_shard).options(**task_options)
    retry_task = ray.remote(retry_failed_rows).options(**task_options)

    result = IngestResult(summary={})
    started = time.time()
    pending: dict[ray.ObjectRef, tuple[str, int]] = {}
    successes_this_run = 0
    shards_by_node: Counter = Counter()
    bar = tqdm(desc="ingest", unit="url", disable=not progress, dynamic_ncols=True)

    def drain(limit: int) -> None:
        nonlocal successes_this_run
        while len(pending) > limit:
            ready, _ = ray.wait(list(pending), num_returns=1)
            kind, shard_id = pending.pop(ready[0])
            try:
                stats = ray.get(ready[0])
            except (ray.exceptions.RayError, OSError) as err:
                result.shards_failed[shard_id] = str(err).splitlines()[0][:300]
                continue
            (result.shards_retried if kind == "retry" else result.shards_written).append(shard_id)
            successes_this_run += stats["successes"]
            shards_by_node[stats["node_id"]] += 1
            bar.update(stats["count"])
            bar.set_postfix(shards=len(result.shards_written) + len(result.shards_retried),
                            ok=successes_this_run, failed_shards=len(result.shards_failed))

    if retry_failed:
        for shard_id in sorted(done):
            stats = read_stats(out_dir, shard_id)
            if stats["successes"] < stats["count"]:
                drain(processes - 1)
                pending[retry_task.remote(str(out_dir), shard_id, settings)] = ("retry", shard_id)

    for shard_id, chunk in enumerate(iter_chunks(spec, settings.shard_rows)):
        if shard_id in done:
            continue
        drain(processes - 1)
        pending[download_task.remote(str(out_dir), shard_id, chunk, settings)] = ("download", shard_id)
    drain(0)
    bar.close()
    clear_staging(out_dir)

    wall = time.time() - started
    result.summary = summarise(out_dir)
    result.summary["this_run"] = {
        "shards_written": len(result.shards_written),
        "shards_retried": len(result.shards_retried),
        "shards_skipped_complete": len(done),
        "shards_failed": {shard_name(k): v for k, v in sorted(result.shards_failed.items())},
        "successes": successes_this_run,
        "shards_by_ray_node": dict(shards_by_node),
        "wall_seconds": round(wall, 3),
        "images_per_second": round(successes_this_run / wall, 2) if wall > 0 else 0.0,
        "settings": asdict(settings),
    }
    write_json(out_dir / SUMMARY_FILE, result.summary)
    return result
