"""`cm3 ingest` end to end: real HTTP over loopback, real img2dataset, a real Ray cluster, real Parquet."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlencode

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cm3.core.shards import TMP_DIR, complete_shards, parquet_path, read_stats
from cm3.pipeline.download import CONFIG_FILE
from cm3.pipeline.image_checks import failure_reason
from cm3.synthetic.checker import read_attributes
from cm3.synthetic.server import BROKEN_CASES, DemoDataServer, write_url_list

from conftest import BIN, RAY_ENV, cm3, free_port


def read_rows(out: Path) -> list[dict]:
    rows = []
    for shard_id in complete_shards(out):
        rows += pq.read_table(parquet_path(out, shard_id)).to_pylist()
    return rows


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def hostile_urls(server, secret: Path) -> list[str]:
    """URLs that would reach this machine's own files (or another protocol) if ingest fetched more than http(s)."""
    inline = "data:image/png;base64," + base64.b64encode(secret.read_bytes()).decode()
    return [secret.as_uri(), secret.as_uri().replace("file:", "FILE:"), str(secret), inline, "ftp://127.0.0.1:9/a.jpg",
            "gopher://127.0.0.1:9/a.jpg", f"{server.url}/redirect?{urlencode({'to': secret.as_uri()})}",
            f"{server.url}/redirect?{urlencode({'to': 'ftp://127.0.0.1:9/a.jpg'})}"]


def test_happy_path_and_every_broken_case_on_a_local_cluster(demo_server, tmp_path):
    urls = tmp_path / "urls.jsonl"
    write_url_list(urls, demo_server.url, 60, include_broken=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    Image.new("RGB", (64, 64), (13, 200, 77)).save(secret)  # a real image: fetched, it would be a success
    hostile = hostile_urls(demo_server, secret)
    with urls.open("a") as handle:  # captions that would land in `outside` if anything used them as paths
        handle.writelines(json.dumps({"url": url, "caption": f"../../outside/{i}.jpg"}) + "\n"
                          for i, url in enumerate(hostile))
    before = snapshot(outside)
    out = tmp_path / "raw"
    proc = cm3("ingest", str(urls), "--out", str(out), "--shard-rows", "25", "--timeout", "2",
               "--threads", "8", "--no-progress", check=True)
    assert "dashboard: http://127.0.0.1:" in proc.stdout

    rows = read_rows(out)
    assert len(rows) == 60 + len(BROKEN_CASES) + len(hostile)
    by_url = {row["url"]: row for row in rows}
    for name, (path, expected) in BROKEN_CASES.items():
        row = by_url[demo_server.url + path]
        outcome = "success" if row["status"] == "success" else failure_reason(row["error_message"])
        assert outcome == expected, (name, row["status"], row["error_message"])
    for url in hostile:
        row = by_url[url]
        assert row["status"] == "failed_to_download" and row["jpg"] is None, (url, row["error_message"])
        assert failure_reason(row["error_message"]) == "unsupported_scheme", (url, row["error_message"])
    assert snapshot(outside) == before

    successes = [row for row in rows if row["status"] == "success"]
    expected_ok = 60 + sum(1 for _, outcome in BROKEN_CASES.values() if outcome == "success")
    assert len(successes) == expected_ok
    agree = 0
    for row in successes:
        image = Image.open(io.BytesIO(row["jpg"]))
        assert image.size == (256, 256) and image.mode == "RGB"
        assert (row["width"], row["height"]) == (256, 256)
        if "/images/" in row["url"]:
            reading = read_attributes(image)
            agree += reading.colour in row["caption"] and reading.shape in row["caption"]
    assert agree >= 57  # the center-crop resize keeps what the caption says (60 demo images)

    summary = json.loads((out / "ingest_summary.json").read_text())
    assert summary["count"] == len(rows) and summary["successes"] == expected_ok
    failures = {outcome: 1 for _, outcome in BROKEN_CASES.values() if outcome != "success"}
    assert summary["failures_by_reason"] == {**failures, "unsupported_scheme": len(hostile)}
    assert summary["this_run"]["images_per_second"] > 0
    assert sorted(p.name for p in out.glob("*_stats.json")) == [f"{i:05d}_stats.json" for i in range(4)]
    assert not (out / TMP_DIR).exists()
    assert "failures by reason:" in proc.stdout and f"unsupported_scheme: {len(hostile)}" in proc.stdout


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file"),
        ("format", "cannot tell the format"),
        ("column", "no url column"),
        ("empty", "empty"),
        ("resize", "--resize-mode"),
    ],
)
def test_bad_input_lists_exit_2_and_write_nothing(tmp_path, case, message):
    path = tmp_path / {"missing": "gone.parquet", "format": "urls.xml", "column": "urls.csv",
                       "empty": "urls.jsonl", "resize": "ok.txt"}[case]
    if case == "format":
        path.write_text("<urls/>")
    elif case == "column":
        path.write_text("link,caption\nhttp://127.0.0.1:9/a.jpg,a\n")
    elif case == "empty":
        path.write_text("")
    elif case == "resize":
        path.write_text("http://127.0.0.1:9/a.jpg\n")
    out = tmp_path / "out"
    extra = ["--resize-mode", "stretch"] if case == "resize" else []
    proc = cm3("ingest", str(path), "--out", str(out), *extra)
    assert proc.returncode == 2
    assert message in proc.stderr and "error:" in proc.stderr
    assert not out.exists()


def test_a_folder_from_another_input_is_refused_untouched(demo_server, tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    (out / CONFIG_FILE).write_text(json.dumps({"input": {"path": "/elsewhere"}, "settings": {}}))
    before = snapshot(out)
    urls = write_url_list(tmp_path / "urls.csv", demo_server.url, 5)
    proc = cm3("ingest", str(urls), "--out", str(out))
    assert proc.returncode == 2 and "holds shards from another input" in proc.stderr
    assert snapshot(out) == before


@pytest.mark.cluster
def test_two_node_cluster_runs_shards_on_both_nodes(demo_server, ray_cluster, tmp_path):
    urls = write_url_list(tmp_path / "urls.parquet", demo_server.url, 160)
    out = tmp_path / "raw"
    proc = cm3("ingest", str(urls), "--out", str(out), "--ray-address", ray_cluster.address,
               "--shard-rows", "20", "--processes", "2", "--threads", "4", "--no-progress", check=True)
    assert f"Ray cluster at {ray_cluster.address}" in proc.stdout
    summary = json.loads((out / "ingest_summary.json").read_text())
    assert summary["successes"] == 160 and summary["shards"] == 8
    assert len(summary["this_run"]["shards_by_ray_node"]) == 2, summary["this_run"]["shards_by_ray_node"]


@pytest.mark.cluster
def test_resume_after_sigkill_of_the_driver(demo_server, ray_cluster, tmp_path):
    total, shard_rows = 400, 5
    urls = write_url_list(tmp_path / "urls.parquet", demo_server.url, total)
    out = tmp_path / "raw"
    args = ["ingest", str(urls), "--out", str(out), "--ray-address", ray_cluster.address,
            "--shard-rows", str(shard_rows), "--processes", "1", "--threads", "1", "--no-progress"]
    driver = subprocess.Popen([str(BIN / "cm3"), *args], env={**os.environ, **RAY_ENV},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(complete_shards(out)) < 4 and time.time() < deadline:
        assert driver.poll() is None, "the ingest finished before it could be killed"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done_before = complete_shards(out)
    assert 4 <= len(done_before) < total // shard_rows

    # What a kill mid-write leaves behind: a cut parquet with no stats file. It must not count.
    victim = max(done_before) + 1
    parquet_path(out, victim).write_bytes(b"PAR1 cut short")
    assert victim not in complete_shards(out)
    untouched = {s: parquet_path(out, s).stat().st_mtime_ns for s in done_before}

    cm3(*args, check=True)
    rows = read_rows(out)
    assert len(rows) == total
    assert len({row["key"] for row in rows}) == total
    assert sorted(row["url"] for row in rows) == sorted(pq.read_table(urls).column("url").to_pylist())
    assert all(row["status"] == "success" for row in rows)
    assert {s: parquet_path(out, s).stat().st_mtime_ns for s in done_before} == untouched
    assert pq.read_table(parquet_path(out, victim)).num_rows == shard_rows


@pytest.mark.cluster
def test_retry_failed_downloads_only_the_failed_rows(ray_cluster, tmp_path):
    """Half the URLs point at a host that is down; after it comes up, --retry-failed fetches just those."""
    up = DemoDataServer(n=40, port=0).start()
    down_port = free_port()
    urls = tmp_path / "urls.parquet"
    write_url_list(tmp_path / "up.parquet", up.url, 20)
    write_url_list(tmp_path / "down.parquet", f"http://127.0.0.1:{down_port}", 20)
    table = pa.concat_tables([pq.read_table(tmp_path / "up.parquet"), pq.read_table(tmp_path / "down.parquet")])
    pq.write_table(table, urls)
    out = tmp_path / "raw"
    args = ["ingest", str(urls), "--out", str(out), "--ray-address", ray_cluster.address,
            "--shard-rows", "10", "--timeout", "2", "--no-progress"]
    try:
        cm3(*args, check=True)
        first = read_rows(out)
        assert sum(row["status"] == "success" for row in first) == 20
        assert {failure_reason(r["error_message"]) for r in first if r["status"] != "success"} == {"connection_error"}
        clean_shards = {0: parquet_path(out, 0).stat().st_mtime_ns,
                        1: parquet_path(out, 1).stat().st_mtime_ns}

        with DemoDataServer(n=40, port=down_port):
            proc = cm3(*args, "--retry-failed", check=True)
        assert "2 retried" in proc.stdout
        second = read_rows(out)
        assert len(second) == 40 and all(row["status"] == "success" for row in second)
        assert [r["key"] for r in second] == [r["key"] for r in first]
        assert {s: parquet_path(out, s).stat().st_mtime_ns for s in clean_shards} == clean_shards
        stats = read_stats(out, 3)
        assert stats["successes"] == 10 and stats["retries_of_failed_rows"] == 1
    finally:
        up.stop()
