"""The retrieval index: maximum-inner-product search over (L2-normalised) CLIP document vectors.

CM3Leon retrieves documents by cosine similarity of CLIP vectors; with normalised vectors that is
the inner product, so every index here uses ``faiss.METRIC_INNER_PRODUCT``. This module chooses an
index type for a size and memory budget, builds it, tunes its one search knob (``nprobe`` or
``efSearch``) against exact search to reach a recall target, and saves/loads it atomically.
``build_index`` is the batch index (queries/s over whole shards); ``online_index`` builds, from the
same parts, the one for single queries.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cm3.core.files import atomic_write

METRIC = faiss.METRIC_INNER_PRODUCT
DEFAULT_MEMORY_BUDGET = 8 * 2**30
INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "ids.npy", "index.json"
FORMAT_VERSION = 1

FLAT_MAX_N = 1_000  # below this, exact search is as fast as anything
HNSW_MAX_N = 10_000  # below this, too few vectors to train IVF/PQ well
IVF_FLAT_MAX_N = 1_000_000  # up to here, uncompressed IVF if it fits the budget
HNSW_M = 32
HNSW_QUANTIZER_MIN_NLIST = 16_384  # a flat coarse quantizer gets slow to assign beyond this
PQ_BYTES = (256, 128, 96, 64, 48, 32, 24, 16, 8, 4)  # largest (most accurate) first
ID_BYTES = 8  # int64 id per vector, in the inverted lists and in our id map each
TRAIN_POINTS_PER_LIST = 50  # faiss warns below 39; more buys little recall and costs build time
PQ_MIN_TRAIN = 256 * 39  # each 8-bit PQ sub-quantizer runs k-means with 256 centroids
TUNE_QUERIES = 500
QUERY_NOISE = 0.1  # tuning queries = data vectors + noise of this norm relative to the data's
PLATEAU = 0.001  # a doubling of the knob that gains less recall than this: target unreachable
TUNE_MARGIN = 0.005  # aim this far above the target: recall on a few hundred queries is itself noisy
BISECT_TOLERANCE = 1 / 16  # stop bisecting the knob within ~6% of the smallest value reaching the target
# A tuned IVF that probes this share of its lists scans as much as exact search, without BLAS: keep exact.
EXACT_SCAN_FRACTION = 0.5
KMEANS_ITERATIONS = 10  # faiss's default 25 trains far longer for no recall gain at a tuned nprobe (docs/index.md)


@dataclass(frozen=True)
class IndexChoice:
    """What to build and why: a ``faiss.index_factory`` string plus the numbers behind it."""

    factory: str
    kind: str  # flat | hnsw | ivf_flat | ivf_pq
    nlist: int | None
    hnsw_m: int | None
    pq_bytes: int | None
    estimated_bytes: int
    reason: str
    ef_construction: int | None = None  # HNSW graphs: candidates kept while linking (None: faiss's default, 40)


def parse_memory_size(text: str) -> int:
    """'512MB', '4GB', '4GiB', '1e9', '123' -> bytes, in binary units as autofaiss reads them."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not match:
        raise ValueError(f"{text!r} is not a memory size (e.g. 512MB, 4GB, 1000000)")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " "))


def _pow2(x: float) -> int:
    return 2 ** round(math.log2(x))


def _nlist(n: int) -> int:
    """~4*sqrt(n) inverted lists up to 1M vectors (autofaiss), 16k-64k from 1M to 10M and beyond."""
    if n <= IVF_FLAT_MAX_N:
        return max(1, _pow2(4 * math.sqrt(n)))
    return min(max(_pow2(16 * math.sqrt(n)), 2**14), 2**16)


def _pq_layout(dim: int, pq_bytes: int) -> int:
    """OPQ output dimension: a multiple of the sub-quantizer count, at most 4 dims each and <= dim."""
    return min(4 * pq_bytes, (dim // pq_bytes) * pq_bytes)


def _ivf_pq_bytes(n: int, dim: int, nlist: int, pq_bytes: int, hnsw_quantizer: bool) -> int:
    d_out = _pq_layout(dim, pq_bytes)
    quantizer = nlist * d_out * 4 + (nlist * 2 * HNSW_M * 4 if hnsw_quantizer else 0)
    return n * (pq_bytes + 2 * ID_BYTES) + quantizer + dim * d_out * 4 + 256 * d_out * 4


def choose_index(n_vectors: int, dim: int, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
                 hnsw_quantizer: bool | None = None) -> IndexChoice:
    """Pick the index for ``n_vectors`` of ``dim`` under a memory budget (autofaiss's rules, see module doc).

    Flat below 1k vectors, HNSW32 below 10k, IVF-Flat (nlist ~ 4*sqrt(n)) up to 1M when it fits,
    else OPQ+IVF+PQ with the largest PQ code that fits. Raises ValueError when nothing fits.
    ``hnsw_quantizer`` forces (True) or forbids (False) an HNSW coarse quantizer for the IVF kinds;
    None uses one from 16k lists up, where a flat one gets slow to assign.
    """
    if n_vectors < 1 or dim < 1:
        raise ValueError(f"need n_vectors >= 1 and dim >= 1, got n_vectors={n_vectors}, dim={dim}")
    budget = memory_budget_bytes
    flat_bytes = n_vectors * (4 * dim + ID_BYTES)
    if n_vectors < FLAT_MAX_N and flat_bytes <= budget:
        return IndexChoice("Flat", "flat", None, None, None, flat_bytes,
                           f"{n_vectors} < {FLAT_MAX_N} vectors: exact search is as fast as any index")
    hnsw_bytes = n_vectors * (4 * dim + 2 * HNSW_M * 4 + 2 * ID_BYTES)
    if n_vectors < HNSW_MAX_N and hnsw_bytes <= budget:
        return IndexChoice(f"HNSW{HNSW_M}", "hnsw", None, HNSW_M, None, hnsw_bytes,
                           f"{n_vectors} < {HNSW_MAX_N} vectors: too few to train IVF; HNSW needs no training")
    nlist = _nlist(n_vectors)
    if hnsw_quantizer is None:
        hnsw_quantizer = nlist >= HNSW_QUANTIZER_MIN_NLIST
    coarse = f"IVF{nlist}_HNSW{HNSW_M}" if hnsw_quantizer else f"IVF{nlist}"
    ivf_flat_bytes = n_vectors * (4 * dim + 2 * ID_BYTES) + nlist * dim * 4 + (
        nlist * 2 * HNSW_M * 4 if hnsw_quantizer else 0)
    if n_vectors <= IVF_FLAT_MAX_N and ivf_flat_bytes <= budget:
        return IndexChoice(f"{coarse},Flat", "ivf_flat", nlist, None, None, ivf_flat_bytes,
                           f"{n_vectors} vectors fit uncompressed in the budget ({ivf_flat_bytes / 2**30:.2f} GiB"
                           f" <= {budget / 2**30:.2f} GiB): IVF-Flat, nlist ~ 4*sqrt(n)")
    for pq_bytes in (b for b in PQ_BYTES if b <= dim):
        size = _ivf_pq_bytes(n_vectors, dim, nlist, pq_bytes, hnsw_quantizer)
        if size <= budget:
            d_out = _pq_layout(dim, pq_bytes)
            return IndexChoice(f"OPQ{pq_bytes}_{d_out},{coarse},PQ{pq_bytes}", "ivf_pq", nlist, None, pq_bytes, size,
                               f"{n_vectors} x {dim} float32 does not fit {budget / 2**30:.2f} GiB uncompressed:"
                               f" largest PQ code that fits is {pq_bytes} bytes/vector")
    smallest = min(b for b in PQ_BYTES if b <= dim)
    need = _ivf_pq_bytes(n_vectors, dim, nlist, smallest, hnsw_quantizer)
    raise ValueError(f"memory budget {budget} bytes is too small for {n_vectors} x {dim} vectors: even PQ{smallest}"
                     f" needs about {need} bytes")


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(threads: int | None) -> None:
    """OpenMP defaults to every core of the host, even ones outside our CPU affinity/cgroup."""
    faiss.omp_set_num_threads(threads or _available_cpus())


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, dim], got shape {x.shape}")
    return x


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product: the ground truth that recall is measured against."""
    vectors, queries = _as_matrix(vectors, "vectors"), _as_matrix(queries, "queries")
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    return flat.search(queries, k)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Fraction of the exact top-k ids (per query, -1 padding ignored) that the approximate search found."""
    approx_ids, exact_ids = np.asarray(approx_ids), np.asarray(exact_ids)
    if approx_ids.shape[0] != exact_ids.shape[0]:
        raise ValueError(f"query counts differ: {approx_ids.shape[0]} vs {exact_ids.shape[0]}")
    found = total = 0
    for approx, exact in zip(approx_ids, exact_ids):
        truth = exact[exact >= 0]
        found += np.isin(truth, approx).sum()
        total += truth.size
    return float(found / total) if total else 1.0


def _param_name(kind: str) -> str | None:
    return {"ivf_flat": "nprobe", "ivf_pq": "nprobe", "hnsw": "efSearch"}.get(kind)


def _search_params(choice: IndexChoice, value: int) -> dict[str, int]:
    """The knob's value, plus the HNSW coarse quantizer's efSearch which must cover nprobe."""
    name = _param_name(choice.kind)
    if name is None:
        return {}
    params = {name: value}
    if choice.nlist is not None and "_HNSW" in choice.factory:
        params["quantizer_efSearch"] = max(64, 2 * value)
    return params


def _apply(index: faiss.Index, params: dict[str, int]) -> None:
    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


class VectorIndex:
    """A FAISS inner-product index plus its row -> user id map, tuned search parameters and build record."""

    def __init__(self, index: faiss.Index, ids: np.ndarray, info: dict[str, Any],
                 metadata: dict[str, Any] | None = None):
        self.index = index
        self.ids = ids
        self.info = info
        self.metadata = dict(metadata or {})
        _apply(index, info.get("search_params", {}))

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores [q, k], user ids [q, k]); ids are -1 where fewer than k exist."""
        queries = _as_matrix(np.atleast_2d(queries), "queries")
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dim {queries.shape[1]} does not match the index dim {self.dim}")
        scores, rows = self.index.search(queries, k)
        ids = np.where(rows >= 0, np.asarray(self.ids)[np.maximum(rows, 0)], -1)
        return scores, ids

    def save(self, folder: str | os.PathLike) -> Path:
        """Write index.faiss, ids.npy, then index.json, each atomically (``atomic_write``), JSON last.

        index.json is the commit marker: it is removed first, so a crash mid-save leaves a folder that
        ``load`` refuses rather than a JSON describing files that are not (yet) there.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / META_FILE).unlink(missing_ok=True)
        atomic_write(folder / INDEX_FILE, lambda staged: faiss.write_index(self.index, str(staged)))
        atomic_write(folder / IDS_FILE, lambda staged: np.save(staged, np.asarray(self.ids, dtype=np.int64)))
        record = {"format_version": FORMAT_VERSION, **self.info, "metadata": self.metadata}
        atomic_write(folder / META_FILE, json.dumps(record, indent=2))
        return folder

    @staticmethod
    def read_record(folder: str | os.PathLike) -> dict[str, Any]:
        """A saved index's index.json (build record, with its ``metadata``), without opening the index."""
        meta_path = Path(folder) / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{folder} has no {META_FILE}: not a saved index, or its save did not finish")
        return json.loads(meta_path.read_text())

    @classmethod
    def load(cls, folder: str | os.PathLike, mmap: bool = True, threads: int | None = None) -> "VectorIndex":
        """Open a saved index; with ``mmap`` the vectors/codes stay on disk and pages load on demand."""
        folder = Path(folder)
        record = cls.read_record(folder)
        metadata = record.pop("metadata", {})
        record.pop("format_version", None)
        set_threads(threads)
        index = _read_index(folder / INDEX_FILE, mmap)
        ids = np.load(folder / IDS_FILE, mmap_mode="r" if mmap else None)
        if index.ntotal != len(ids) or index.d != record["dim"]:
            raise ValueError(f"{folder}: index.faiss ({index.ntotal} x {index.d}) does not match ids.npy"
                             f" ({len(ids)}) / index.json (dim {record['dim']})")
        return cls(index, ids, record, metadata)


def _read_index(path: Path, mmap: bool) -> faiss.Index:
    """IO_FLAG_MMAP_IFC maps flat codes, HNSW storage and IVF lists; older faiss has only IO_FLAG_MMAP (IVF)."""
    if not mmap:
        return faiss.read_index(str(path))
    flag = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)
    try:
        return faiss.read_index(str(path), flag)
    except RuntimeError as err:
        warnings.warn(f"faiss cannot memory-map {path} ({str(err).splitlines()[0]}); reading it into memory",
                      stacklevel=3)
        return faiss.read_index(str(path))


def _on_gpu(index: faiss.Index, kind: str) -> faiss.Index | None:
    """A GPU copy for training/adding when faiss has GPUs (HNSW has no GPU version), else None."""
    if kind == "hnsw" or not (hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0):
        return None
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as err:  # e.g. a PQ code size the GPU IVFPQ does not support
        warnings.warn(f"building on CPU: faiss cannot put this index on the GPU ({str(err).splitlines()[0]})",
                      stacklevel=3)
        return None


def checked_inputs(vectors: np.ndarray, ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [n, d] vectors, int64 [n] unique ids: row numbers when None), or a ValueError saying what is wrong."""
    vectors = _as_matrix(vectors, "vectors")
    n = len(vectors)
    if n == 0:
        raise ValueError("cannot build an index from an empty vector set (0 vectors)")
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids)
    if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be {n} integers (one per vector), got shape {ids.shape} dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if len(np.unique(ids)) != n:
        raise ValueError("ids must be unique")
    return vectors, ids


def reporter(progress: bool) -> Callable[[str], None]:
    """Progress lines to stderr, or nothing."""
    return (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)


def fill_index(vectors: np.ndarray, choice: IndexChoice, rng: np.random.Generator, rows: np.ndarray | None = None,
               train_sample: int | None = None, add_batch: int = 100_000,
               say: Callable[[str], None] = reporter(False)) -> faiss.Index:
    """A new ``choice`` index trained on a sample of ``vectors[rows]`` (default 50 per IVF list) and filled with
    them in ``rows`` order (every row in order when None), on the GPU when faiss has one and the index allows."""
    n, dim = len(vectors) if rows is None else len(rows), vectors.shape[1]
    index = faiss.index_factory(dim, choice.factory, METRIC)
    if choice.nlist is not None:
        faiss.extract_index_ivf(index).cp.niter = KMEANS_ITERATIONS
    if choice.ef_construction is not None:
        faiss.downcast_index(index).hnsw.efConstruction = choice.ef_construction
    device = _on_gpu(index, choice.kind)
    work = device or index
    if choice.nlist is not None:
        per_list = max(TRAIN_POINTS_PER_LIST * choice.nlist, PQ_MIN_TRAIN if choice.kind == "ivf_pq" else 0)
        size = min(n, train_sample or per_list)
        sample = np.sort(rng.choice(n, size=size, replace=False))
        say(f"training on {size} sampled vectors")
        work.train(vectors[sample if rows is None else rows[sample]])
    for lo in range(0, n, add_batch):
        work.add(vectors[lo:lo + add_batch] if rows is None else vectors[rows[lo:lo + add_batch]])
        say(f"added {min(lo + add_batch, n)}/{n}")
    return index if device is None else faiss.index_gpu_to_cpu(device)


def _tuning_queries(vectors: np.ndarray, n_queries: int, rng: np.random.Generator) -> np.ndarray:
    """Data vectors plus small Gaussian noise: queries that look like the data without being copies of it."""
    rows = rng.choice(len(vectors), size=min(n_queries, len(vectors)), replace=False)
    sample = vectors[np.sort(rows)]
    scale = QUERY_NOISE * float(np.linalg.norm(sample, axis=1).mean()) / math.sqrt(vectors.shape[1])
    return (sample + rng.normal(scale=scale, size=sample.shape)).astype(np.float32)


def tune_knob(index: faiss.Index, choice: IndexChoice, queries: np.ndarray, exact_ids: np.ndarray, k: int,
              target: float, say: Callable[[str], None]) -> tuple[dict[str, int], float]:
    """Smallest knob value (within BISECT_TOLERANCE) with recall@k >= target + TUNE_MARGIN: doubling, then bisection.

    If recall stops improving (a doubling gains < PLATEAU, as with PQ codes) the target is unreachable
    and the value before the plateau is kept.
    """
    def recall(value: int) -> float:
        _apply(index, _search_params(choice, value))
        r = recall_at_k(index.search(queries, k)[1], exact_ids)
        say(f"  {_param_name(choice.kind)}={value}: recall@{k}={r:.4f}")
        return r

    if choice.kind == "flat":
        return {}, recall_at_k(index.search(queries, k)[1], exact_ids)
    target = min(1.0, target + TUNE_MARGIN)
    low, high = (max(k, 16), 2**14) if choice.kind == "hnsw" else (1, choice.nlist)
    below, value, r = None, low, recall(low)
    while r < target and value < high:
        nxt = min(2 * value, high)
        r_next = recall(nxt)
        if r_next - r < PLATEAU:
            return _search_params(choice, value), r
        below, value, r = value, nxt, r_next
    if below is not None and r >= target:
        while value - below > max(1, int(value * BISECT_TOLERANCE)):
            mid = (below + value) // 2
            r_mid = recall(mid)
            if r_mid >= target:
                value, r = mid, r_mid
            else:
                below = mid
    return _search_params(choice, value), r


def _queries_per_second(index: faiss.Index, queries: np.ndarray, k: int, repeats: int = 2) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        index.search(queries, k)
        best = min(best, time.perf_counter() - start)
    return len(queries) / best


def build_index(
    vectors: np.ndarray,
    ids: np.ndarray | None = None,
    choice: IndexChoice | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    train_sample: int | None = None,
    add_batch: int = 100_000,
    recall_target: float = 0.95,
    k: int = 10,
    seed: int = 0,
    progress: bool = False,
    metadata: dict[str, Any] | None = None,
    threads: int | None = None,
    tune_queries: int = TUNE_QUERIES,
) -> VectorIndex:
    """Choose (unless given), train, fill and tune an inner-product index over ``vectors`` [n, d] float32.

    ``ids`` (int64, unique) are what ``search`` returns; row numbers when None. IVF indexes train on
    a random sample of ``train_sample`` vectors (default 50 per list). The search knob is then tuned
    to the smallest value reaching ``recall_target`` recall@k against exact search on
    ``tune_queries`` noisy data vectors; the measured recall and queries/s are kept in ``info``. When the
    index was chosen here (``choice`` is None) and exact search turns out faster than the tuned index on those
    queries (evenly spread vectors, where reaching the recall target means scanning much of the data), the
    exact index is kept instead, with the measurements in its ``reason``.
    """
    start = time.perf_counter()
    vectors, ids = checked_inputs(vectors, ids)
    n, dim = vectors.shape
    chosen_by_us = choice is None
    choice = choice or choose_index(n, dim, memory_budget_bytes)
    say = reporter(progress)
    set_threads(threads)
    rng = np.random.default_rng(seed)
    say(f"building {choice.factory} ({choice.kind}) for {n} x {dim}: {choice.reason}")
    index = fill_index(vectors, choice, rng, train_sample=train_sample, add_batch=add_batch, say=say)
    trained_seconds = time.perf_counter() - start

    queries = _tuning_queries(vectors, tune_queries, rng)
    flat = faiss.IndexFlatIP(dim)  # exact search: the tuning's ground truth, and a contender
    flat.add(vectors)
    flat_seconds = time.perf_counter()
    exact_ids = flat.search(queries, k)[1]
    flat_seconds = time.perf_counter() - flat_seconds
    params, recall = tune_knob(index, choice, queries, exact_ids, k, recall_target, say)
    _apply(index, params)
    qps = _queries_per_second(index, queries, k)
    flat_qps = len(queries) / flat_seconds
    if chosen_by_us and choice.kind != "flat" and n * (4 * dim + ID_BYTES) <= memory_budget_bytes:
        scanned = params.get("nprobe", 0) / choice.nlist if choice.nlist else 0.0
        faster = flat_qps > qps and _queries_per_second(flat, queries, k, repeats=1) > qps  # twice: no fluke
        if scanned >= EXACT_SCAN_FRACTION or faster:
            say(f"exact search: {flat_qps:.0f} queries/s against {qps:.0f} for {choice.factory} with {params}"
                f" (recall {recall:.4f}): keeping exact search")
            choice = IndexChoice("Flat", "flat", None, None, None, n * (4 * dim + ID_BYTES),
                                 f"{choice.factory} needed {params} for recall@{k} {recall:.4f} and answered {qps:.0f}"
                                 f" queries/s; exact (BLAS) search answered {flat_qps:.0f} at recall 1: the vectors"
                                 f" are too evenly spread for an approximate index to pay off")
            index, params, recall, qps = flat, {}, 1.0, flat_qps
    del flat
    info = {
        "workload": "batch", "choice": asdict(choice), "factory": choice.factory, "kind": choice.kind, "dim": dim,
        "n": n, "metric": "inner_product", "search_params": params, "k": k, "recall_target": recall_target,
        "recall_at_k": recall, "recall_target_met": recall >= recall_target, "queries_per_second": qps,
        "train_add_seconds": trained_seconds, "build_seconds": time.perf_counter() - start,
    }
    say(f"tuned {params or 'nothing to tune'}: recall@{k}={recall:.4f}, {qps:.0f} queries/s,"
        f" built in {info['build_seconds']:.1f} s")
    return VectorIndex(index, ids, info, metadata)
