"""Benchmark: cm3's batch and online indexes against autofaiss, same vectors, same memory budget, one run.

Vectors: a Gaussian mixture (``--centres`` centres, default 4096, each point = centre + isotropic
noise of ``--spread`` times the centres' scale, default 2.0, then L2-normalised). CLIP document
vectors are clustered by topic, not uniform on the sphere (uniform noise is a worst case no IVF/HNSW
user sees); spread 2.0 makes two points of one cluster only ~0.2 cosine apart, because at spread 1.0
(cosine ~0.5) IVF found 99% of the top-10 with nprobe=1, a test of nothing. Queries are fresh draws from the same
mixture (not database rows). Both contenders index the same float32 array, written once to a
temporary folder as ``emb.npy``.

- cm3 batch: ``build_index(vectors, memory_budget_bytes=B, k=K)`` in this process (choice, training,
  adding, tuning nprobe/efSearch against exact search: all counted as build time); what
  ``cm3 build-index`` writes augmented shards with.
- cm3 online: ``build_online_index(vectors, memory_budget_bytes=B, k=K)`` (candidates, held-out tuning,
  latency timing: all build time), saved and loaded memory-mapped as a server opens it; what
  ``cm3 build-index --online`` adds for ``cm3 search``, ``cm3 generate --index`` and serving.
- autofaiss: ``autofaiss.build_index(embeddings=FOLDER, max_index_memory_usage=B, metric_type="ip",
  min_nearest_neighbors_to_retrieve=K, save_on_disk=False, nb_cores=T, ...)`` in a subprocess of the
  Python that has autofaiss (it pins numpy<2 and cannot share cm3's venv); the wall time of that call
  is its build time (reading the .npy, choosing, training, adding, its own tuning and metrics).

Both cm3 indexes tune to ``--recall-target``: by default ``autofaiss``, i.e. the recall@K that autofaiss's
index reached on the benchmark's queries (autofaiss picks its search parameter for speed, 10 ms per query, not
for a recall), so they are compared at equal recall, the usual way to compare approximate indexes; a number
(cm3's product default is 0.95) compares cm3's default behaviour instead.

All run under this process's faiss, with the same thread count: recall@K against exact search (IndexFlatIP)
on ``--queries`` queries, batch queries/s (best of 3 passes over all queries) and single-query latency p50 and
p99 (one query per call, the first 500 queries). Prints one table, the ratios of each workload against
autofaiss (batch: build, queries/s; online: p50, p99) and the targets (batch: recall >= autofaiss's, build
speed >= 1.0x, queries/s >= 1.0x; online: recall >= autofaiss's, p50 <= autofaiss's), and writes JSON.

Usage (from the repository root):

    python3 -m venv /tmp/autofaiss-venv && /tmp/autofaiss-venv/bin/pip install autofaiss 'pyarrow<20'
    .venv/bin/python benchmarks/index.py --n 200000
    .venv/bin/python benchmarks/index.py --autofaiss-python /tmp/autofaiss-venv/bin/python   # 1M x 512
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Python puts this script's folder first on sys.path, and benchmarks/ holds scripts named like stdlib
# modules (tokenize.py) that numpy's import would pick up instead; drop it before importing numpy.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from cm3.index.faiss_index import VectorIndex, build_index, exact_search, parse_memory_size, recall_at_k  # noqa: E402
from cm3.index.online_index import build_online_index, single_query_latency_ms  # noqa: E402

INSTALL_HINT = ("autofaiss is not importable here. It needs numpy<2, so give it its own venv:\n"
                "    python3 -m venv /tmp/autofaiss-venv\n"
                "    /tmp/autofaiss-venv/bin/pip install autofaiss 'pyarrow<20'\n"
                "and pass --autofaiss-python /tmp/autofaiss-venv/bin/python")
DEFAULT_AUTOFAISS_PYTHON = "/tmp/autofaiss-venv/bin/python"
LATENCY_QUERIES = 500

# Runs inside the autofaiss interpreter: build, time the call, write the index and its search params.
AUTOFAISS_WORKER = """
import json, sys, time, faiss
from autofaiss import build_index
folder, out, budget, k, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
faiss.omp_set_num_threads(threads)
start = time.perf_counter()
index, infos = build_index(embeddings=folder, max_index_memory_usage=f"{budget}B", current_memory_available="16G",
                           min_nearest_neighbors_to_retrieve=k, metric_type="ip", save_on_disk=False,
                           nb_cores=threads, verbose=30)
seconds = time.perf_counter() - start
faiss.write_index(index, out + "/autofaiss.index")
json.dump({"build_seconds": seconds, "index_key": infos["index_key"], "index_param": infos["index_param"]},
          open(out + "/autofaiss.json", "w"))
"""


def parse_bytes(text: str) -> int:
    try:
        return parse_memory_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_recall_target(text: str) -> str | float:
    if text == "autofaiss":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'autofaiss' or a recall in (0, 1]")
    return value


def clustered_vectors(n: int, dim: int, centres: np.ndarray, spread: float, rng: np.random.Generator,
                      chunk: int = 100_000) -> np.ndarray:
    """n unit vectors from a Gaussian mixture around ``centres`` (built in chunks to bound memory)."""
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        x = centres[rng.integers(len(centres), size=hi - lo)]
        x += rng.standard_normal((hi - lo, dim), dtype=np.float32) * spread
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def measure(search, queries: np.ndarray, exact_ids: np.ndarray, k: int) -> dict[str, float]:
    """recall@k, batch queries/s (best of 3) and single-query latency p50/p99 of one contender."""
    recall = recall_at_k(search(queries, k), exact_ids)
    batch = min(_timed(search, queries, k) for _ in range(3))
    p50, p99 = single_query_latency_ms(search, queries[:LATENCY_QUERIES], k)
    return {"recall_at_k": recall, "queries_per_second": len(queries) / batch, "latency_ms_p50": p50,
            "latency_ms_p99": p99}


def _timed(search, queries: np.ndarray, k: int) -> float:
    start = time.perf_counter()
    search(queries, k)
    return time.perf_counter() - start


def run_autofaiss(python: str, folder: Path, budget: int, k: int, threads: int) -> tuple[faiss.Index, dict]:
    proc = subprocess.run([python, "-c", AUTOFAISS_WORKER, str(folder), str(folder), str(budget), str(k),
                           str(threads)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"autofaiss failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    info = json.loads((folder / "autofaiss.json").read_text())
    index = faiss.read_index(str(folder / "autofaiss.index"))
    if info["index_param"]:
        faiss.ParameterSpace().set_index_parameters(index, info["index_param"])
    return index, info


def autofaiss_python(requested: str | None) -> str:
    """The interpreter that can import autofaiss, or exit with install instructions."""
    candidates = [requested] if requested else [sys.executable, DEFAULT_AUTOFAISS_PYTHON]
    for python in candidates:
        if python == sys.executable and importlib.util.find_spec("autofaiss") is not None:
            return python
        if python != sys.executable and Path(python).exists():
            probe = subprocess.run([python, "-c", "import autofaiss"], capture_output=True)
            if probe.returncode == 0:
                return python
    raise SystemExit(INSTALL_HINT)


def ratios_against(ours: dict, theirs: dict) -> dict[str, float]:
    """x > 1: cm3 better (faster build, more queries/s, lower latency); recall_diff >= 0: cm3 recalls as much."""
    return {"build_speed_x": theirs["build_seconds"] / ours["build_seconds"],
            "queries_per_second_x": ours["queries_per_second"] / theirs["queries_per_second"],
            "latency_p50_x": theirs["latency_ms_p50"] / ours["latency_ms_p50"],
            "latency_p99_x": theirs["latency_ms_p99"] / ours["latency_ms_p99"],
            "recall_diff": ours["recall_at_k"] - theirs["recall_at_k"]}


def print_table(rows: dict[str, dict], k: int) -> dict:
    """One line per contender, a ratio line per cm3 workload, then the targets of each workload."""
    ratios = {name: ratios_against(row, rows["autofaiss"]) for name, row in rows.items() if name != "autofaiss"}
    targets = {}
    if "batch" in ratios:
        batch = ratios["batch"]
        targets.update({"batch recall >= autofaiss": batch["recall_diff"] >= 0,
                        "batch build speed >= 1.0x": batch["build_speed_x"] >= 1.0,
                        "batch queries/s >= 1.0x": batch["queries_per_second_x"] >= 1.0})
    if "online" in ratios:
        online = ratios["online"]
        targets.update({"online recall >= autofaiss": online["recall_diff"] >= 0,
                        "online p50 latency <= autofaiss": online["latency_p50_x"] >= 1.0})
    header = (f"{'':16} {'index':40} {'build s':>8} {f'recall@{k}':>9} {'queries/s':>10} {'p50 ms':>8}"
              f" {'p99 ms':>8}")
    print(header + "\n" + "-" * len(header))
    for name, row in rows.items():
        label = name if name == "autofaiss" else f"cm3 {name}"
        print(f"{label:16} {row['index'][:40]:40} {row['build_seconds']:8.1f} {row['recall_at_k']:9.4f}"
              f" {row['queries_per_second']:10.0f} {row['latency_ms_p50']:8.2f} {row['latency_ms_p99']:8.2f}")
    for name, ratio in ratios.items():
        print(f"{f'{name} ratio':16} {'cm3 ' + name + ' vs autofaiss':40} {ratio['build_speed_x']:7.2f}x"
              f" {ratio['recall_diff']:+9.4f} {ratio['queries_per_second_x']:9.2f}x {ratio['latency_p50_x']:7.2f}x"
              f" {ratio['latency_p99_x']:7.2f}x")
    for name, met in targets.items():
        print(f"target {name}: {'MET' if met else 'NOT MET'}")
    return {"ratios": ratios, "targets": targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--memory-budget", type=parse_bytes, default=parse_bytes("4GB"))
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--centres", type=int, default=4096, help="Gaussian-mixture centres")
    parser.add_argument("--spread", type=float, default=2.0,
                        help="per-dimension noise around a centre, in units of the centres' own spread")
    parser.add_argument("--threads", type=int, default=None, help="faiss threads for both (default: all our CPUs)")
    parser.add_argument("--autofaiss-python", default=None, help="interpreter with autofaiss installed")
    parser.add_argument("--recall-target", type=parse_recall_target, default="autofaiss",
                        help="cm3's recall@k target: 'autofaiss' (the recall autofaiss reached) or a number")
    parser.add_argument("--workloads", choices=["both", "batch", "online"], default="both",
                        help="which cm3 indexes to build against autofaiss")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-index/index_benchmark.json"))
    args = parser.parse_args()
    python = autofaiss_python(args.autofaiss_python)
    threads = args.threads or len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(threads)

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.centres, args.dim), dtype=np.float32)
    vectors = clustered_vectors(args.n, args.dim, centres, args.spread, rng)
    queries = clustered_vectors(args.queries, args.dim, centres, args.spread, rng)
    exact_ids = exact_search(vectors, queries, args.k)[1]
    print(f"{args.n} x {args.dim} float32 ({vectors.nbytes / 2**30:.2f} GiB), {args.centres}-centre mixture,"
          f" budget {args.memory_budget / 2**30:.2f} GiB, {args.queries} queries, k={args.k}, {threads} threads,"
          f" faiss {faiss.__version__}", flush=True)

    folder = Path(tempfile.mkdtemp(prefix="cm3-index-bench-"))
    rows = {}
    try:
        np.save(folder / "emb.npy", vectors)
        theirs_index, theirs_info = run_autofaiss(python, folder, args.memory_budget, args.k, threads)
        faiss.omp_set_num_threads(threads)
        rows["autofaiss"] = {"index": f"{theirs_info['index_key']} [{theirs_info['index_param']}]",
                             "build_seconds": theirs_info["build_seconds"],
                             **measure(lambda q, k: theirs_index.search(q, k)[1], queries, exact_ids, args.k)}
        print(f"autofaiss done: {rows['autofaiss']['index']} in {theirs_info['build_seconds']:.1f} s", flush=True)
        del theirs_index

        recall = rows["autofaiss"]["recall_at_k"] if args.recall_target == "autofaiss" else args.recall_target
        print(f"cm3 recall@{args.k} target: {recall:.4f} ({args.recall_target})", flush=True)
        common = {"memory_budget_bytes": args.memory_budget, "k": args.k, "seed": args.seed, "threads": threads,
                  "progress": True, "recall_target": recall}
        if args.workloads in ("both", "batch"):
            batch = build_index(vectors, **common)
            rows["batch"] = {"index": f"{batch.info['factory']} {batch.info['search_params']}",
                             "build_seconds": batch.info["build_seconds"], "tuning_recall": batch.info["recall_at_k"],
                             **measure(lambda q, k: batch.search(q, k)[1], queries, exact_ids, args.k)}
            del batch
        if args.workloads in ("both", "online"):
            built = build_online_index(vectors, **common)
            built.save(folder / "online")
            online = VectorIndex.load(folder / "online", mmap=True, threads=threads)  # as a server opens it
            rows["online"] = {"index": f"{built.info['factory']} {built.info['search_params']}",
                              "build_seconds": built.info["build_seconds"], "tuning_recall": built.info["recall_at_k"],
                              "candidates": built.info["candidates"],
                              **measure(lambda q, k: online.search(q, k)[1], queries, exact_ids, args.k)}
            del built, online
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    summary = print_table(rows, args.k)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {**vars(args), "out": str(args.out)}, "threads": threads,
                                    "faiss": faiss.__version__, **{f"cm3_{n}" if n != "autofaiss" else n: row
                                                                   for n, row in rows.items()}, **summary}, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
