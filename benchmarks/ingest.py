"""Benchmark: `cm3 ingest` against plain img2dataset, same URLs, same loopback server, one run.

Both contenders download the same URL list (parquet: url, caption) from one demo-data server
that runs in its own process with every image pre-rendered (the server's own JPEG cache holds
only 512 images, so without that the server would spend ~8 ms of CPU per request rendering,
and be the bottleneck for both). Both get the same process count, thread count, shard size,
timeout, image size and resize mode.

Each contender runs as a fresh subprocess and is timed twice:

- img2dataset: this script re-run as a child that calls ``img2dataset.download(...,
  distributor="multiprocessing")``; (a) the whole child (interpreter, ``import img2dataset``,
  download) and (b) the ``download()`` call alone (its pool start-up and list sharding included).
- cm3: ``cm3 ingest URLS --out DIR --ray-address ...``, joined to one Ray cluster that this
  script starts once (so Ray's own start-up is paid by neither); (a) the whole command
  (interpreter, imports, Ray connection, download, summary) and (b) the download phase alone,
  ``this_run.wall_seconds`` of its ``ingest_summary.json`` (Ray workers' first imports included).

The order of the two alternates across repeats; every repeat must give both contenders the same
number of successful images. Prints a table with images/s and the ratio cm3 / img2dataset for
the whole command and the download phase, against the 0.9x target, and writes the results as
``ingest_benchmark.json`` into the work folder.

Usage (from the repository root):

    .venv/bin/python benchmarks/ingest.py                       # 10k URLs, 2 processes x 32 threads
    .venv/bin/python benchmarks/ingest.py --n 2000 --repeats 2 --out runs/bench-ingest

The Ray cluster is stopped at the end, even on error, with the effect of ``ray stop --force``
limited to its own processes (``cm3.workflows.ray_cluster``): ``ray stop`` itself would also kill
every other Ray cluster on the machine.
"""

from __future__ import annotations

import os
import sys

# Run as `python benchmarks/ingest.py`, this folder is sys.path[0]: a sibling script named like a
# standard module (benchmarks/tokenize.py shadows `tokenize`) would break the imports below.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if not p or os.path.realpath(p) != _HERE]

import argparse
import json
import multiprocessing as mp
import platform
import queue
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before img2dataset imports albumentations
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

LOOPBACK = "127.0.0.1"
TARGET_RATIO = 0.9
BIN = Path(sys.executable).parent  # the virtual environment's bin/: cm3 and ray live there
RESULTS_FILE = "ingest_benchmark.json"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(NO_ALBUMENTATIONS_UPDATE="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    return env


# --------------------------------------------------------------------------- the data server


def _render(index: int) -> bytes:
    from cm3.synthetic.server import image_jpeg

    return image_jpeg.__wrapped__(0, "train", index)  # seed 0, train split: what the URL list names


def _serve(n: int, render_workers: int, ready, stop) -> None:
    """Server process: pre-render every image, serve them from memory until ``stop`` is set."""
    from cm3.synthetic import server as demo_server

    started = time.time()
    with mp.get_context("spawn").Pool(render_workers) as pool:
        jpegs = pool.map(_render, range(n), chunksize=64)
    rendered = time.time() - started
    original = demo_server.image_jpeg
    table = {(0, "train", i): body for i, body in enumerate(jpegs)}

    def image_jpeg(seed: int, split: str, index: int) -> bytes:
        body = table.get((seed, split, index))
        return body if body is not None else original(seed, split, index)

    demo_server.image_jpeg = image_jpeg  # the request handler looks the function up at call time
    server = demo_server.DemoDataServer(n=n, seed=0, split="train", port=0).start()
    ready.put({"url": server.url, "render_seconds": round(rendered, 2), "pid": os.getpid(),
               "bytes": sum(len(b) for b in jpegs)})
    try:
        stop.wait()
    finally:
        server.stop()


class ServerProcess:
    def __init__(self, n: int, render_workers: int):
        ctx = mp.get_context("spawn")
        self._ready, self._stop = ctx.Queue(), ctx.Event()
        self.process = ctx.Process(target=_serve, args=(n, render_workers, self._ready, self._stop),
                                   name="demo-data-server")
        self.info: dict = {}

    def start(self, timeout: float = 900) -> dict:
        self.process.start()
        deadline = time.time() + timeout
        while not self.info:
            if not self.process.is_alive():
                raise RuntimeError(f"the demo data server exited early (code {self.process.exitcode})")
            if time.time() > deadline:
                raise TimeoutError("the demo data server did not start in time")
            try:
                self.info = self._ready.get(timeout=1)
            except queue.Empty:
                pass
        return self.info

    def stop(self) -> None:
        if self.process.pid is None:
            return
        self._stop.set()
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


def warm_and_measure(base_url: str, n: int, threads: int) -> dict:
    """Request every image once (checks the server, warms sockets and page cache); time it."""
    urls = [f"{base_url}/images/train/{i}.jpg" for i in range(n)]

    def fetch(url: str) -> int:
        for attempt in range(3):  # a loaded machine can stall one request; the contenders retry nothing
            try:
                with urllib.request.urlopen(url, timeout=30) as response:
                    return len(response.read())
            except OSError:
                if attempt == 2:
                    raise
        return 0

    started = time.time()
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(fetch, urls))
    seconds = time.time() - started
    if min(sizes) == 0:
        raise RuntimeError("the demo data server answered an empty image")
    return {"requests": n, "seconds": round(seconds, 3), "requests_per_second": round(n / seconds, 1),
            "client_threads": threads}


# --------------------------------------------------------------------------- the contenders


def count_successes(folder: Path) -> tuple[int, int, dict]:
    """(successes, urls, span) from the img2dataset-format *_stats.json files of a shard folder."""
    successes = count = 0
    starts, ends = [], []
    for stats_file in sorted(folder.glob("[0-9]*_stats.json")):
        stats = json.loads(stats_file.read_text())
        successes += int(stats["successes"])
        count += int(stats["count"])
        starts.append(stats.get("start_time"))
        ends.append(stats.get("end_time"))
    if not starts or None in starts or None in ends:
        raise RuntimeError(f"{folder}: no shard stats with start and end times")
    span = {"first_shard_start": min(starts), "last_shard_end": max(ends),
            "span_seconds": round(max(ends) - min(starts), 3)}
    return successes, count, span


def count_parquet_successes(folder: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_table(path, columns=["status"]).column("status").to_pylist().count("success")
               for path in sorted(folder.glob("[0-9]*.parquet")))


def img2dataset_child(config: dict) -> None:
    """In a fresh interpreter (like `cm3 ingest`): import img2dataset, time its download() call."""
    started = time.time()
    import img2dataset

    imported = time.time()
    img2dataset.download(
        url_list=config["url_list"], input_format="parquet", url_col="url", caption_col="caption",
        output_format="parquet", output_folder=config["out"],
        processes_count=config["processes"], thread_count=config["threads"],
        image_size=256, resize_mode="center_crop", number_sample_per_shard=config["shard_rows"],
        distributor="multiprocessing", extract_exif=False, compute_hash="sha256",
        enable_wandb=False, timeout=10,
    )
    finished = time.time()
    Path(config["timing"]).write_text(json.dumps(
        {"import_seconds": round(imported - started, 3), "download_seconds": round(finished - imported, 3)}))


def run_img2dataset(url_list: Path, out: Path, args) -> dict:
    """`img2dataset.download(...)` in a subprocess running this script, so both contenders pay
    an interpreter start and their imports in the whole-command time."""
    shutil.rmtree(out, ignore_errors=True)
    timing = out.parent / "img2dataset_timing.json"
    timing.unlink(missing_ok=True)
    config = {"url_list": str(url_list), "out": str(out), "processes": args.processes,
              "threads": args.threads, "shard_rows": args.shard_rows, "timing": str(timing)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--img2dataset-child", json.dumps(config)]
    started = time.time()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    wall = time.time() - started
    log = out.parent / "img2dataset.log"
    log.write_text(f"$ {' '.join(cmd)}\n{done.stdout}\n{done.stderr}")
    if done.returncode != 0 or not timing.exists():
        raise RuntimeError(f"img2dataset failed ({done.returncode}); see {log}\n{done.stderr[-3000:]}")
    child = json.loads(timing.read_text())
    successes, count, span = count_successes(out)
    return {"contender": "img2dataset", "images": successes, "urls": count,
            "parquet_successes": count_parquet_successes(out),
            "whole_seconds": round(wall, 3), "download_seconds": child["download_seconds"],
            "import_seconds": child["import_seconds"],
            "shard_span_seconds": span["span_seconds"], "command": cmd, "started": started}


def run_cm3(url_list: Path, out: Path, args, ray_address: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(BIN / "cm3"), "ingest", str(url_list), "--out", str(out),
           "--processes", str(args.processes), "--threads", str(args.threads),
           "--shard-rows", str(args.shard_rows), "--timeout", "10",
           "--cpus-per-task", str(args.cpus_per_task), "--ray-address", ray_address, "--no-progress"]
    started = time.time()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    wall = time.time() - started
    (out.parent / "cm3_ingest.log").write_text(f"$ {' '.join(cmd)}\n{done.stdout}\n{done.stderr}")
    if done.returncode != 0:
        raise RuntimeError(f"cm3 ingest failed ({done.returncode}); see {out.parent / 'cm3_ingest.log'}\n"
                           f"{done.stderr[-3000:]}")
    summary = json.loads((out / "ingest_summary.json").read_text())
    this_run = summary["this_run"]
    successes, count, span = count_successes(out)
    if successes != this_run["successes"]:
        raise AssertionError(f"cm3: shard stats say {successes} successes, ingest_summary.json {this_run['successes']}")
    return {"contender": "cm3 ingest", "images": successes, "urls": count,
            "parquet_successes": count_parquet_successes(out),
            "whole_seconds": round(wall, 3), "download_seconds": this_run["wall_seconds"],
            "summary_images_per_second": this_run["images_per_second"],
            "shard_span_seconds": span["span_seconds"], "command": cmd, "started": started}


# --------------------------------------------------------------------------- report


def rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else 0.0


def summarise(runs: list[dict]) -> dict:
    """Median times per contender and phase over the repeats, images/s and the cm3/img2dataset ratios."""
    def median(contender: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["contender"] == contender)

    images = runs[0]["images"]
    out: dict = {"images": images}
    ratios = {}
    for phase in ("whole", "download", "shard_span"):
        i2d = rate(images, median("img2dataset", f"{phase}_seconds"))
        cm3 = rate(images, median("cm3 ingest", f"{phase}_seconds"))
        out[f"img2dataset_{phase}_seconds"] = median("img2dataset", f"{phase}_seconds")
        out[f"img2dataset_{phase}_images_per_second"] = round(i2d, 1)
        out[f"cm3_{phase}_seconds"] = median("cm3 ingest", f"{phase}_seconds")
        out[f"cm3_{phase}_images_per_second"] = round(cm3, 1)
        ratios[phase] = cm3 / i2d
    out.update(
        ratio_whole=round(ratios["whole"], 3), ratio_download=round(ratios["download"], 3),
        ratio_shard_span=round(ratios["shard_span"], 3), target=TARGET_RATIO,
        target_met_whole=ratios["whole"] >= TARGET_RATIO, target_met_download=ratios["download"] >= TARGET_RATIO,
    )
    return out


def print_table(runs: list[dict], summary: dict, repeats: int) -> None:
    rows = []
    phases = {"img2dataset": "download() call", "cm3 ingest": "download phase"}
    for r in runs:
        name = f"{r['contender']} #{r['repeat']}" if repeats > 1 else r["contender"]
        rows.append((name, "whole command", r["images"], r["whole_seconds"]))
        rows.append((name, phases[r["contender"]], r["images"], r["download_seconds"]))
        rows.append((name, "shards only", r["images"], r["shard_span_seconds"]))
    header = f"{'contender':<16} {'measured':<16} {'images':>7} {'seconds':>9} {'images/s':>9}"
    print("\n" + header)
    print("-" * len(header))
    for name, phase, images, seconds in rows:
        print(f"{name:<16} {phase:<16} {images:>7d} {seconds:>9.2f} {rate(images, seconds):>9.1f}")
    print("-" * len(header))
    med = " (medians over repeats)" if repeats > 1 else ""
    for label, key in (("whole command", "ratio_whole"), ("download phase", "ratio_download")):
        met = "met" if summary[key] >= TARGET_RATIO else "NOT met"
        print(f"ratio cm3/img2dataset, {label:<15}: {summary[key]:.3f}x  "
              f"(target >= {TARGET_RATIO}x: {met}){med}")
    print(f"ratio cm3/img2dataset, {'shards only':<15}: {summary['ratio_shard_span']:.3f}x  "
          "(first shard start to last shard end, from the shards' stats: no start-up, no imports)")


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="URLs in the list (default 10000)")
    parser.add_argument("--processes", type=int, default=2, help="processes / shards in flight (default 2)")
    parser.add_argument("--threads", type=int, default=32, help="download threads per process (default 32)")
    parser.add_argument("--shard-rows", type=int, default=1000, help="URLs per shard (default 1000)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each contender, order alternating")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a new temp dir)")
    parser.add_argument("--cpus-per-task", type=float, default=1.0, help="cm3 --cpus-per-task (default 1.0)")
    parser.add_argument("--ray-cpus", type=int, default=None,
                        help="CPUs of the benchmark's Ray cluster (default: 2, or enough for every process)")
    parser.add_argument("--render-workers", type=int, default=os.cpu_count() or 1,
                        help="processes pre-rendering the demo images before serving")
    parser.add_argument("--warm-threads", type=int, default=32, help="client threads of the warm-up pass")
    parser.add_argument("--img2dataset-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.n, args.processes, args.threads, args.shard_rows, args.repeats) < 1:
        parser.error("--n, --processes, --threads, --shard-rows and --repeats must be at least 1")
    if args.ray_cpus is None:
        args.ray_cpus = max(2, -(-int(args.processes * args.cpus_per_task * 100) // 100))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.img2dataset_child:
        img2dataset_child(json.loads(args.img2dataset_child))
        return 0
    work = (args.out or Path(tempfile.mkdtemp(prefix="cm3-bench-ingest-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)

    server = ServerProcess(args.n, args.render_workers)
    from cm3.workflows.ray_cluster import LocalRayCluster

    cluster = LocalRayCluster(head_cpus=args.ray_cpus)
    runs: list[dict] = []
    results: dict = {}
    try:
        t = time.time()
        info = server.start()
        print(f"demo data server (pid {info['pid']}) at {info['url']}: {args.n} images pre-rendered in "
              f"{info['render_seconds']:.1f} s ({info['bytes'] / 1e6:.1f} MB)", flush=True)
        from cm3.synthetic.server import write_url_list

        url_list = write_url_list(work / "urls.parquet", info["url"], args.n)
        warm = warm_and_measure(info["url"], args.n, args.warm_threads)
        print(f"warm-up: every image fetched once in {warm['seconds']:.1f} s "
              f"({warm['requests_per_second']:.0f} requests/s from {args.warm_threads} client threads)", flush=True)

        address = cluster.start().address
        print(f"Ray head at {address} ({args.ray_cpus} CPUs) started in {cluster.start_seconds:.1f} s", flush=True)

        for repeat in range(args.repeats):
            order = ["img2dataset", "cm3"] if repeat % 2 == 0 else ["cm3", "img2dataset"]
            by_contender = {}
            for contender in order:
                folder = work / f"repeat{repeat}"
                print(f"[repeat {repeat}] {contender} ...", flush=True)
                if contender == "img2dataset":
                    result = run_img2dataset(url_list, folder / "img2dataset", args)
                else:
                    result = run_cm3(url_list, folder / "cm3", args, address)
                result.update(repeat=repeat, position=order.index(contender))
                print(f"[repeat {repeat}] {contender}: {result['images']} images, "
                      f"{result['whole_seconds']:.1f} s", flush=True)
                by_contender[contender] = result
                runs.append(result)
            a, b = by_contender["img2dataset"], by_contender["cm3"]
            assert a["images"] > 0, "img2dataset downloaded nothing"
            assert a["images"] == b["images"], (
                f"repeat {repeat}: img2dataset has {a['images']} successful images, cm3 {b['images']}")
            assert a["images"] == a["parquet_successes"] and b["images"] == b["parquet_successes"]

        summary = summarise(runs)
        print_table(runs, summary, args.repeats)
        results = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "versions": _versions(),
            "server": {**info, "warm_up": warm},
            "ray": {"address": address, "num_cpus": args.ray_cpus, "start_seconds": round(cluster.start_seconds, 2)},
            "runs": runs,
            "summary": summary,
            "total_seconds": round(time.time() - t, 1),
        }
        (work / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        print(f"results: {work / RESULTS_FILE}")
    except BaseException as err:
        partial = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "runs": runs, "error": f"{type(err).__name__}: {err}"}
        (work / RESULTS_FILE).write_text(json.dumps(partial, indent=2))
        print(f"failed; the runs so far are in {work / RESULTS_FILE}", file=sys.stderr)
        raise
    finally:
        cluster.stop()
        server.stop()
    return 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("cm3", "img2dataset", "ray", "pyarrow", "opencv-python-headless", "opencv-python"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
