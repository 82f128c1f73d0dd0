"""A loopback HTTP server for the demo data set, plus deliberately broken URLs.

It lets the download/ingest stage be exercised end to end without internet: images are
generated on the fly from their index, URL lists come in every format the ingester reads,
and ``/broken/...`` serves each failure mode a real crawl meets (404, truncated bytes,
HTML instead of an image, a stalled server, redirects, decompression bombs, odd modes).
``/redirect?to=URL`` redirects anywhere, as a hostile server would (to ``file:``, ``ftp:``, ...).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import struct
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from .shapes import SPLITS, encode_jpeg, encode_png, render, render_mask, spec_for

LOOPBACK = "127.0.0.1"
COLUMNS = ("url", "caption", "shape", "colour", "size", "position", "background")
URL_LIST_FORMATS: dict[str, str] = {  # format (file suffix) -> Content-Type
    "jsonl": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8",
    "tsv": "text/tab-separated-values; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
    "txt": "text/plain; charset=utf-8",
}
# name -> (path, the outcome a downloader should record for it)
BROKEN_CASES: dict[str, tuple[str, str]] = {
    "404": ("/broken/404.jpg", "http_404"),
    "truncated": ("/broken/truncated.jpg", "truncated"),
    "html": ("/broken/html.jpg", "not_an_image"),
    "slow": ("/broken/slow.jpg", "timeout"),
    "redirect": ("/broken/redirect.jpg", "success"),
    "huge": ("/broken/huge.png", "image_too_large"),
    "alpha": ("/broken/alpha.png", "success"),
    "grey": ("/broken/grey.jpg", "success"),
    "cmyk": ("/broken/cmyk.jpg", "success"),
}
HUGE_SIDE = 16000  # huge.png claims HUGE_SIDE x HUGE_SIDE greyscale pixels (256 MP)
TRUNCATE_FRACTION = 0.6
HTML_PAGE = b"<!doctype html>\n<html><head><title>Not found</title></head><body>No image here.</body></html>\n"


def image_path(split: str, index: int) -> str:
    return f"/images/{split}/{index}.jpg"


def _broken_source_index(name: str, n: int) -> int:
    """Which image of the split a broken case is made from (distinct per case, always < n)."""
    return list(BROKEN_CASES).index(name) % n


def url_rows(
    base_url: str,
    n: int,
    seed: int = 0,
    split: str = "train",
    include_broken: bool = False,
    limit: int | None = None,
) -> list[dict[str, str]]:
    """The URL list: one row per image (the first ``limit``), then optionally one per broken case."""
    base_url = base_url.rstrip("/")

    def row(path: str, index: int) -> dict[str, str]:
        spec = spec_for(index, seed, split)
        attributes = {k: getattr(spec, k) for k in COLUMNS[2:]}
        return {"url": base_url + path, "caption": spec.alt_text, **attributes}

    count = n if limit is None else max(0, min(limit, n))
    rows = [row(image_path(split, i), i) for i in range(count)]
    if include_broken:
        rows += [row(path, _broken_source_index(name, n)) for name, (path, _) in BROKEN_CASES.items()]
    return rows


def encode_url_list(rows: Sequence[dict[str, str]], fmt: str) -> bytes:
    if fmt == "txt":
        return "".join(r["url"] + "\n" for r in rows).encode()
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if fmt in ("csv", "tsv"):
        text = io.StringIO()
        delimiter = "," if fmt == "csv" else "\t"
        writer = csv.DictWriter(text, fieldnames=COLUMNS, delimiter=delimiter, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return text.getvalue().encode()
    if fmt == "parquet":
        table = pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in COLUMNS})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue()
    raise ValueError(f"unknown URL list format {fmt!r}; expected one of {sorted(URL_LIST_FORMATS)}")


def write_url_list(
    path: str | Path,
    base_url: str,
    n: int,
    seed: int = 0,
    split: str = "train",
    include_broken: bool = False,
    fmt: str | None = None,
) -> Path:
    """Write the list a server at ``base_url`` would serve; the format defaults to the suffix."""
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".")
    path.write_bytes(encode_url_list(url_rows(base_url, n, seed, split, include_broken), fmt))
    return path


@functools.lru_cache(maxsize=8192)
def image_jpeg(seed: int, split: str, index: int) -> bytes:
    return encode_jpeg(render(spec_for(index, seed, split)))


@functools.lru_cache(maxsize=1)
def huge_png() -> bytes:
    """A valid all-black greyscale PNG of HUGE_SIDE^2 pixels, ~250 KB, built in well under a second.

    Deflate after a full flush forgets all history, so every block of identical rows
    compresses to identical bytes: compress one block and repeat it instead of all 256 MB.
    """
    block_rows = 100
    assert HUGE_SIDE % block_rows == 0
    zeros = bytes(block_rows * (HUGE_SIDE + 1))  # each row: filter byte 0, then zero pixels
    compressor = zlib.compressobj(9)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)  # starts with the zlib header
    repeat = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    checksum = 1
    for _ in range(HUGE_SIDE // block_rows):
        checksum = zlib.adler32(zeros, checksum)
    final_empty_block = b"\x03\x00"
    data = first + repeat * (HUGE_SIDE // block_rows - 1) + final_empty_block + struct.pack(">I", checksum)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", HUGE_SIDE, HUGE_SIDE, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@functools.lru_cache(maxsize=64)
def broken_body(name: str, seed: int, split: str, n: int) -> tuple[str, bytes]:
    """(Content-Type, body) of a broken case that is answered with 200 OK."""
    index = _broken_source_index(name, n)
    spec = spec_for(index, seed, split)
    if name == "truncated":
        full = image_jpeg(seed, split, index)
        return "image/jpeg", full[: int(len(full) * TRUNCATE_FRACTION)]
    if name == "html":
        return "text/html; charset=utf-8", HTML_PAGE
    if name == "slow":
        return "image/jpeg", image_jpeg(seed, split, index)
    if name == "grey":
        return "image/jpeg", encode_jpeg(render(spec).convert("L"))
    if name == "cmyk":
        return "image/jpeg", encode_jpeg(render(spec).convert("CMYK"))
    if name == "huge":
        return "image/png", huge_png()
    if name == "alpha":
        rgba = render(spec).convert("RGBA")
        rgba.putalpha(render_mask(spec))
        return "image/png", encode_png(rgba)
    raise KeyError(name)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: a crawl makes thousands of requests."""

    def _send(
        self, status: int, content_type: str, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _not_found(self) -> None:
        self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def do_GET(self) -> None:
        demo = self.server.demo
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        segments = path.strip("/").split("/")
        if len(segments) == 3 and segments[0] == "images" and segments[2].endswith(".jpg"):
            split, stem = segments[1], segments[2][: -len(".jpg")]
            if split not in SPLITS or not stem.isdigit() or int(stem) >= demo.n:
                return self._not_found()
            return self._send(200, "image/jpeg", image_jpeg(demo.seed, split, int(stem)))
        if len(segments) == 1 and segments[0].startswith("urls."):
            fmt = segments[0][len("urls.") :]
            if fmt not in URL_LIST_FORMATS:
                return self._not_found()
            try:
                limit = int(query["n"][0]) if "n" in query else None
            except ValueError:
                return self._send(400, "text/plain; charset=utf-8", b"n must be an integer\n")
            broken = query.get("broken", ["0"])[0] not in ("0", "", "false")
            rows = url_rows(demo.url, demo.n, demo.seed, demo.split, include_broken=broken, limit=limit)
            return self._send(200, URL_LIST_FORMATS[fmt], encode_url_list(rows, fmt))
        if path == "/redirect" and "to" in query:
            return self._send(302, "text/plain; charset=utf-8", b"moved\n", {"Location": query["to"][0]})
        return self._broken(path)

    def _broken(self, path: str) -> None:
        demo = self.server.demo
        name = next((k for k, (p, _) in BROKEN_CASES.items() if p == path), None)
        if name is None or name == "404":
            return self._not_found()
        if name == "redirect":
            target = image_path(demo.split, _broken_source_index(name, demo.n))
            return self._send(302, "text/plain; charset=utf-8", b"moved\n", {"Location": demo.url + target})
        if name == "slow" and demo.stopping.wait(demo.slow_seconds):
            return  # shutting down: drop the request rather than answer late
        content_type, body = broken_body(name, demo.seed, demo.split, demo.n)
        self._send(200, content_type, body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stalled client must not block shutdown
    request_queue_size = 512  # downloaders open hundreds of connections at once; the default backlog is 5
    demo: DemoDataServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up early (timeouts, header-only probes) is normal, not an error."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class DemoDataServer:
    """The demo data set over HTTP on 127.0.0.1; use as a context manager or start()/stop()."""

    def __init__(
        self,
        n: int = 1000,
        seed: int = 0,
        split: str = "train",
        port: int = 0,
        slow_seconds: float = 5.0,
        host: str = LOOPBACK,
    ) -> None:
        if host != LOOPBACK:
            raise ValueError(f"the demo server binds to {LOOPBACK} only, not {host!r}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
        if n < 1:
            raise ValueError("n must be at least 1")
        self.n, self.seed, self.split, self.port, self.slow_seconds = n, seed, split, port, slow_seconds
        self.stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not running; call start() first")
        return f"http://{LOOPBACK}:{self._httpd.server_address[1]}"

    def list_url(self, fmt: str = "parquet", broken: bool = False) -> str:
        return f"{self.url}/urls.{fmt}" + ("?broken=1" if broken else "")

    def start(self) -> DemoDataServer:
        if self._httpd is not None:
            raise RuntimeError("already started")
        self.stopping.clear()
        self._httpd = _Server((LOOPBACK, self.port), _Handler)
        self._httpd.demo = self
        serve = functools.partial(self._httpd.serve_forever, poll_interval=0.05)
        self._thread = threading.Thread(target=serve, name="demo-data-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        assert self._thread is not None
        self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> DemoDataServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve_forever(
    n: int, seed: int = 0, split: str = "train", port: int = 0, write_lists_dir: str | Path | None = None
) -> None:
    """Serve until Ctrl-C, printing the base URL and URL-list URLs (the ``cm3 demo-data serve`` body)."""
    with DemoDataServer(n=n, seed=seed, split=split, port=port) as server:
        print(f"demo data: {n} {split} images (seed {seed}) at {server.url}")
        for fmt in URL_LIST_FORMATS:
            print(f"  {server.list_url(fmt)}   (broken cases: {server.list_url(fmt, broken=True)})")
        if write_lists_dir is not None:
            folder = Path(write_lists_dir)
            folder.mkdir(parents=True, exist_ok=True)
            for fmt in URL_LIST_FORMATS:
                write_url_list(folder / f"urls.{fmt}", server.url, n, seed, split)
                write_url_list(folder / f"urls_broken.{fmt}", server.url, n, seed, split, include_broken=True)
            print(f"  URL lists written to {folder}")
        print("Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
