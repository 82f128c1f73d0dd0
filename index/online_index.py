"""The online index: retrieval for one query at a time (``cm3 generate --index``, ``cm3 search``, a server).

The batch index (``faiss_index.build_index``) is judged by queries/s over whole shards, where exact search
on BLAS often wins; one query at a time it reads every vector, and its latency grows with the corpus.
Here the index is judged by single-query latency at a recall target instead:

1. Candidates (``online_candidates``): an IVF with an HNSW coarse quantizer (from 10k vectors, nlist ~
   4*sqrt(n), compressed only if the budget needs it) and an HNSW graph, as FAISS and autofaiss use;
   exact search below 1k vectors, and as the fallback when no approximate candidate reaches the target.
2. Held-out queries: ``held_out`` random data vectors stay out of every candidate until it is tuned, so
   recall is measured on queries the index has never seen (a vector already in an HNSW graph finds its
   own neighbours through its links, which flatters the graph). They are added at the end.
3. Each candidate's knob (``nprobe``/``efSearch``) is tuned to the target against exact search on those
   queries (``tune_knob``, as for the batch index), then timed one query per call; the fastest candidate
   that reaches the target wins. The graph is skipped when the tuned IVF scans fewer vectors per query
   than any graph search computes distances to.

The winner's recall, p50/p99 latency and every candidate's figures go to ``index.json``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import faiss
import numpy as np

from cm3.index.faiss_index import (
    DEFAULT_MEMORY_BUDGET,
    FLAT_MAX_N,
    HNSW_M,
    HNSW_MAX_N,
    ID_BYTES,
    IndexChoice,
    VectorIndex,
    checked_inputs,
    choose_index,
    fill_index,
    reporter,
    set_threads,
    tune_knob,
)

HELD_OUT_QUERIES = 1000
# Candidates kept while linking a new node: at least the 2*M links of the base layer. faiss's default, 40, leaves
# hard data short of good links: on benchmarks/index.py's 200k x 512 mixture, efSearch 128 found 0.85 of the top 10
# with efConstruction 40 and 0.99 with 100.
EF_CONSTRUCTION = 100
# Fewest distances an HNSW search computes: efSearch >= 16 nodes expanded, up to 2*M neighbours each.
GRAPH_MIN_DISTANCES = 16 * 2 * HNSW_M


def _flat(n_vectors: int, dim: int) -> IndexChoice:
    return IndexChoice("Flat", "flat", None, None, None, n_vectors * (4 * dim + ID_BYTES),
                       "exact search: recall 1, but every query reads every vector")


def online_candidates(n_vectors: int, dim: int, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> list[IndexChoice]:
    """The indexes worth timing for ``n_vectors`` of ``dim`` under the budget, cheapest to build first, exact last."""
    if n_vectors < 1 or dim < 1:
        raise ValueError(f"need n_vectors >= 1 and dim >= 1, got n_vectors={n_vectors}, dim={dim}")
    flat = _flat(n_vectors, dim)
    candidates = []
    if n_vectors >= HNSW_MAX_N:  # fewer vectors train IVF lists poorly (as for the batch index)
        try:
            candidates.append(choose_index(n_vectors, dim, memory_budget_bytes, hnsw_quantizer=True))
        except ValueError:
            pass
    hnsw_bytes = n_vectors * (4 * dim + 2 * HNSW_M * 4 + 2 * ID_BYTES)
    if n_vectors >= FLAT_MAX_N and hnsw_bytes <= memory_budget_bytes:
        candidates.append(IndexChoice(f"HNSW{HNSW_M}", "hnsw", None, HNSW_M, None, hnsw_bytes,
                                      f"a graph walked from node to node: distances to a few thousand vectors"
                                      f" per query, efConstruction {EF_CONSTRUCTION}", EF_CONSTRUCTION))
    if flat.estimated_bytes <= memory_budget_bytes:
        candidates.append(flat)
    if not candidates:
        raise ValueError(f"memory budget {memory_budget_bytes} bytes is too small for {n_vectors} x {dim} vectors")
    return candidates


def single_query_latency_ms(search, queries: np.ndarray, k: int) -> tuple[float, float]:
    """(p50, p99) milliseconds of ``search(one_query[None], k)`` over ``queries``, one call each, as a server asks."""
    seconds = []
    for query in queries:
        start = time.perf_counter()
        search(query[None], k)
        seconds.append(time.perf_counter() - start)
    p50, p99 = np.percentile(seconds, [50, 99]) * 1000
    return float(p50), float(p99)


def _better(a: dict, b: dict) -> bool:
    """Does candidate record ``a`` beat ``b``: reaching the target first, then lower p50, then higher recall."""
    if a["recall_target_met"] != b["recall_target_met"]:
        return a["recall_target_met"]
    if a["recall_target_met"]:
        return a["latency_ms_p50"] < b["latency_ms_p50"]
    return a["recall_at_k"] > b["recall_at_k"]


def _skip_reason(choice: IndexChoice, n: int, measured: list[dict]) -> str | None:
    """Why ``choice`` need not be built, given the candidates measured so far; None: build it."""
    met = [m for m in measured if m.get("recall_target_met")]
    if choice.kind == "flat" and n >= HNSW_MAX_N and met:
        return f"not timed: {met[0]['factory']} reached the target, and exact search reads all {n} vectors per query"
    if choice.kind == "hnsw":
        for m in met:
            if m["kind"].startswith("ivf") and m["vectors_scanned"] <= GRAPH_MIN_DISTANCES:
                return (f"not built: {m['factory']} scans ~{m['vectors_scanned']:.0f} vectors per query, fewer than"
                        f" the ~{GRAPH_MIN_DISTANCES} distances of the smallest graph search")
    return None


def build_online_index(
    vectors: np.ndarray,
    ids: np.ndarray | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    recall_target: float = 0.95,
    k: int = 10,
    seed: int = 0,
    progress: bool = False,
    metadata: dict[str, Any] | None = None,
    threads: int | None = None,
    held_out: int = HELD_OUT_QUERIES,
    candidates: list[IndexChoice] | None = None,
) -> VectorIndex:
    """The fastest single-query index over ``vectors`` [n, d] that reaches ``recall_target`` recall@k (module doc).

    ``ids`` as for ``build_index``. ``candidates`` default to ``online_candidates``; when none reaches the
    target, the one with the highest recall is kept (exact search, when it fits, always reaches it).
    """
    start = time.perf_counter()
    vectors, ids = checked_inputs(vectors, ids)
    n, dim = vectors.shape
    candidates = candidates or online_candidates(n, dim, memory_budget_bytes)
    say = reporter(progress)
    set_threads(threads)
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(n, size=min(held_out, n // 10), replace=False))
    kept = np.setdiff1d(np.arange(n), held)
    queries = vectors[held] if len(held) else vectors  # under 10 vectors: time exact search on the data itself
    exact = fill_index(vectors, _flat(len(kept), dim), rng, rows=kept)  # the ground truth, and a candidate
    exact_ids = exact.search(queries, k)[1]
    say(f"online index for {n} x {dim}: {len(held)} held-out queries, candidates"
        f" {', '.join(c.factory for c in candidates)}")

    measured: list[dict] = []
    best: tuple[faiss.Index, IndexChoice, dict] | None = None
    for choice in candidates:
        if (skip := _skip_reason(choice, n, measured)) is not None:
            measured.append({"factory": choice.factory, "kind": choice.kind, "skipped": skip})
            say(f"{choice.factory}: {skip}")
            continue
        built_at = time.perf_counter()
        say(f"building {choice.factory}: {choice.reason}")
        index = exact if choice.kind == "flat" else fill_index(vectors, choice, rng, rows=kept, say=say)
        params, recall = tune_knob(index, choice, queries, exact_ids, k, recall_target, say)
        p50, p99 = single_query_latency_ms(index.search, queries, k)
        record = {"factory": choice.factory, "kind": choice.kind, "search_params": params, "recall_at_k": recall,
                  "recall_target_met": recall >= recall_target, "latency_ms_p50": p50, "latency_ms_p99": p99,
                  "vectors_scanned": params.get("nprobe", 0) * len(kept) / choice.nlist if choice.nlist else None,
                  "build_seconds": time.perf_counter() - built_at}
        measured.append(record)
        say(f"{choice.factory} {params}: recall@{k} {recall:.4f}, p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        if best is None or _better(record, best[2]):
            best = (index, choice, record)
    index, choice, record = best
    del exact
    if len(held):
        index.add(vectors[held])
    others = "; ".join(f"{m['factory']}: " + (m["skipped"] if "skipped" in m else
                       f"recall {m['recall_at_k']:.4f}, p50 {m['latency_ms_p50']:.2f} ms")
                       for m in measured if m is not record)
    reason = (f"fastest single query at recall@{k} >= {recall_target}: {choice.factory} {record['search_params']},"
              f" recall {record['recall_at_k']:.4f}, p50 {record['latency_ms_p50']:.2f} ms"
              + (f" (others: {others})" if others else "") + f". {choice.reason}")
    choice_record = {**asdict(choice), "reason": reason}
    info = {
        "workload": "online", "choice": choice_record, "factory": choice.factory, "kind": choice.kind, "dim": dim,
        "n": n, "metric": "inner_product", "search_params": record["search_params"], "k": k,
        "recall_target": recall_target, "recall_at_k": record["recall_at_k"],
        "recall_target_met": record["recall_target_met"], "latency_ms_p50": record["latency_ms_p50"],
        "latency_ms_p99": record["latency_ms_p99"], "held_out_queries": len(held), "candidates": measured,
        "build_seconds": time.perf_counter() - start,
    }
    say(f"online index: {reason}; built in {info['build_seconds']:.1f} s")
    return VectorIndex(index, ids[np.concatenate([kept, held])], info, metadata)
