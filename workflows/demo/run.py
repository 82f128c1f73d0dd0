"""`cm3 demo`: the pipeline end to end on the embedded data, stage by stage, into one work folder.

Stages write into ``WORKDIR/<stage>`` and mark success with a ``.done`` file, so a re-run skips
finished stages and resumes the rest; ``--fresh`` starts over. Today's stages: serve the demo
data over loopback, ``cm3 ingest`` on Ray, then a report (sample grid + metrics.json).
"""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.parquet as pq
from PIL import Image

from cm3.pipeline import raw_shards
from cm3.pipeline.download import DownloadSettings, run_download
from cm3.pipeline.summary import format_summary
from cm3.pipeline.url_list import open_url_list
from cm3.workflows.demo.checker import read_attributes
from cm3.workflows.demo.server import DemoDataServer, write_url_list
from cm3.workflows.ray_session import connect
from cm3.workflows.report import image_grid

DONE = ".done"
DEMO_SHARD_ROWS = 250


def _stage_done(folder: Path) -> bool:
    return (folder / DONE).exists()


def _mark_done(folder: Path, info: dict) -> None:
    raw_shards.write_json_atomic(folder / DONE, info)


def _port_of(url_list: Path) -> int:
    first_url = pq.read_table(url_list, columns=["url"]).column("url")[0].as_py()
    return urlparse(first_url).port or 0


def _start_server(n: int, url_list: Path) -> DemoDataServer:
    """Serve on the port the existing URL list names (so a resumed ingest sees the same list), else any."""
    port = _port_of(url_list) if url_list.exists() else 0
    server = DemoDataServer(n=n, seed=0, split="train", port=port)
    try:
        server.start()
    except OSError:  # that port is taken now: start the stage over on a free one
        url_list.unlink(missing_ok=True)
        server = DemoDataServer(n=n, seed=0, split="train", port=0)
        server.start()
    return server


def ingest_stage(workdir: Path, n: int, ray_address: str | None) -> Path:
    raw = workdir / "raw"
    if _stage_done(raw):
        print(f"[ingest] done already: {raw}")
        return raw
    url_list = workdir / "urls.parquet"
    server = _start_server(n, url_list)
    try:
        if not url_list.exists():
            shutil.rmtree(raw, ignore_errors=True)
            write_url_list(url_list, server.url, n, seed=0, split="train")
        print(f"[ingest] demo data served at {server.url}; URL list {url_list}", flush=True)
        connect(ray_address)
        result = run_download(open_url_list(url_list), raw, DownloadSettings(shard_rows=DEMO_SHARD_ROWS),
                              processes=2, cpus_per_task=0.5)
    finally:
        server.stop()
    print(format_summary(result.summary), flush=True)
    if result.shards_failed:
        raise RuntimeError(f"[ingest] {len(result.shards_failed)} shard(s) failed; run `cm3 demo` again to resume")
    _mark_done(raw, {"finished": time.time(), "successes": result.summary["successes"]})
    return raw


def report_stage(workdir: Path, raw: Path) -> dict:
    """Look at what was ingested: a captioned grid, and whether the pixel checker agrees with each caption."""
    report = workdir / "report"
    report.mkdir(parents=True, exist_ok=True)
    images, captions, agree_colour, agree_shape, checked = [], [], 0, 0, 0
    for shard_id in raw_shards.complete_shards(raw):
        table = pq.read_table(raw_shards.parquet_path(raw, shard_id), columns=["jpg", "caption", "status"])
        for jpg, caption, status in zip(*(table.column(c).to_pylist() for c in ("jpg", "caption", "status"))):
            if status != "success":
                continue
            image = Image.open(io.BytesIO(jpg)).convert("RGB")
            reading = read_attributes(image)
            checked += 1
            agree_colour += f" {reading.colour} " in f" {caption} "
            agree_shape += f" {reading.shape}" in caption
            if len(images) < 16:
                images.append(image)
                captions.append(caption)
    image_grid(images, captions).save(report / "ingested_samples.png")
    summary = raw_shards.read_json(raw / raw_shards.SUMMARY_FILE)
    metrics = {
        "ingest": {
            "urls": summary["count"],
            "success_rate": summary["success_rate"],
            "images_per_second": summary.get("this_run", {}).get("images_per_second"),
            "checker_colour_agreement": round(agree_colour / max(checked, 1), 4),
            "checker_shape_agreement": round(agree_shape / max(checked, 1), 4),
            "command": f"cm3 ingest {workdir / 'urls.parquet'} --out {raw}",
        }
    }
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (report / "report.md").write_text(
        "# cm3 demo report\n\n"
        f"## Ingest\n\n{summary['successes']} of {summary['count']} images downloaded "
        f"({100 * summary['success_rate']:.1f}%); the pixel checker agrees with "
        f"{100 * metrics['ingest']['checker_colour_agreement']:.1f}% of captions on colour and "
        f"{100 * metrics['ingest']['checker_shape_agreement']:.1f}% on shape.\n\n"
        "![ingested samples](ingested_samples.png)\n\n"
        f"Reproduce: `{metrics['ingest']['command']}`\n"
    )
    print(f"[report] {report / 'report.md'}", flush=True)
    return metrics


def run_demo(workdir: Path, n: int = 2000, fresh: bool = False, ray_address: str | None = None) -> dict:
    workdir = Path(workdir)
    if fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    raw = ingest_stage(workdir, n, ray_address)
    return report_stage(workdir, raw)
