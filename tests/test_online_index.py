"""The online index (one query at a time): candidates, held-out tuning against exact search, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cm3.index.faiss_index import IndexChoice, VectorIndex, exact_search, recall_at_k
from cm3.index.online_index import GRAPH_MIN_DISTANCES, build_online_index, online_candidates

GiB = 2**30


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(("n", "budget", "kinds"), [
    (500, 4 * GiB, ["flat"]),
    (5_000, 4 * GiB, ["hnsw", "flat"]),
    (200_000, 4 * GiB, ["ivf_flat", "hnsw", "flat"]),
    (200_000, 300 * 2**20, ["ivf_pq"]),  # neither the graph nor the raw vectors fit 300 MiB
])
def test_candidates_by_size_and_budget(n, budget, kinds):
    candidates = online_candidates(n, 512, budget)
    assert [c.kind for c in candidates] == kinds
    assert all(c.estimated_bytes <= budget for c in candidates)
    ivf = [c for c in candidates if c.nlist is not None]
    assert all("_HNSW32" in c.factory for c in ivf)  # IVF with an HNSW coarse quantizer
    assert all(c.ef_construction for c in candidates if c.kind == "hnsw")


def test_a_budget_nothing_fits_is_refused():
    with pytest.raises(ValueError, match="too small"):
        online_candidates(5_000, 512, 2**20)


@pytest.fixture(scope="module")
def random_100k():
    # Uniform random unit vectors: no cluster structure to help either candidate. dim 16 keeps the two
    # candidate builds (IVF, HNSW) fast on 2 cores; the 512-d runs are benchmarks/index.py.
    return unit_vectors(100_000, 16)


@pytest.fixture(scope="module")
def online_100k(random_100k):
    ids = np.arange(len(random_100k), dtype=np.int64) * 3 + 500  # user ids != row numbers
    # one thread: the HNSW graph (and so the tuned recall) is the same on every run
    return build_online_index(random_100k, ids=ids, recall_target=0.9, metadata={"clip": {"model_name": "m"}},
                              threads=1)


def test_recall_at_10_reaches_the_target_on_100k_random_vectors(random_100k, online_100k):
    info = online_100k.info
    assert info["workload"] == "online" and info["recall_target_met"] and info["recall_at_k"] >= 0.9
    assert info["kind"] in ("hnsw", "ivf_flat") and info["held_out_queries"] == 1000
    timed = [c for c in info["candidates"] if "skipped" not in c]
    assert {c["factory"] for c in timed} >= {info["factory"]}
    assert info["latency_ms_p50"] == min(c["latency_ms_p50"] for c in timed if c["recall_target_met"])
    # fresh queries, neither in the index nor among the held-out ones: the tuned knob must generalise
    queries = unit_vectors(1_000, 16, seed=1)
    exact_ids = exact_search(random_100k, queries, 10)[1]
    rows = (online_100k.search(queries, 10)[1] - 500) // 3
    assert recall_at_k(rows, exact_ids) >= 0.9


def test_held_out_queries_are_added_after_tuning(random_100k, online_100k):
    assert len(online_100k) == len(random_100k)
    assert sorted(np.asarray(online_100k.ids).tolist()) == list(range(500, 500 + 3 * len(random_100k), 3))
    found = online_100k.search(random_100k[:200], 1)[1][:, 0]
    assert (found == np.arange(200) * 3 + 500).mean() >= 0.95  # each vector finds itself


def test_save_load_round_trip_memory_mapped(tmp_path, random_100k, online_100k):
    queries = random_100k[:50]
    scores, ids = online_100k.search(queries, 10)
    online_100k.save(tmp_path / "online")
    record = json.loads((tmp_path / "online" / "index.json").read_text())
    assert record["latency_ms_p50"] <= record["latency_ms_p99"]
    assert record["recall_at_k"] >= record["recall_target"] and record["metadata"] == {"clip": {"model_name": "m"}}
    loaded = VectorIndex.load(tmp_path / "online", mmap=True)
    loaded_scores, loaded_ids = loaded.search(queries, 10)
    np.testing.assert_array_equal(loaded_ids, ids)
    np.testing.assert_allclose(loaded_scores, scores, rtol=1e-6)
    assert loaded.info["search_params"] == online_100k.info["search_params"]


def test_the_graph_is_skipped_when_the_ivf_scans_fewer_vectors_than_a_graph_search():
    """Tight clusters: one or two IVF lists hold a query's neighbours, far fewer vectors than any HNSW search."""
    rng = np.random.default_rng(0)
    centres = unit_vectors(512, 64)
    x = centres[rng.integers(512, size=25_000)] + 0.02 * rng.standard_normal((25_000, 64), dtype=np.float32)
    index = build_online_index(x / np.linalg.norm(x, axis=1, keepdims=True), recall_target=0.9, held_out=200)
    ivf, graph, flat = index.info["candidates"]
    assert index.info["kind"] == "ivf_flat" and ivf["recall_target_met"]
    assert ivf["vectors_scanned"] <= GRAPH_MIN_DISTANCES
    assert graph["kind"] == "hnsw" and "not built" in graph["skipped"]
    assert flat["kind"] == "flat" and "not timed" in flat["skipped"]


def test_exact_search_is_the_fallback_when_no_approximate_index_reaches_the_target():
    vectors = unit_vectors(12_000, 16)
    coarse = IndexChoice("IVF64,SQ4", "ivf_pq", 64, None, None, 0, "4-bit codes: recall stops short of 0.95")
    index = build_online_index(vectors, candidates=[coarse, online_candidates(12_000, 16)[-1]], held_out=200)
    pq, flat = index.info["candidates"]
    assert pq["kind"] == "ivf_pq" and not pq["recall_target_met"]
    assert index.info["kind"] == flat["kind"] == "flat" and index.info["recall_at_k"] == 1.0
    np.testing.assert_array_equal(index.search(vectors[:5], 1)[1][:, 0], np.arange(5))


def test_tiny_sets_get_exact_search():
    vectors = unit_vectors(7, 8)  # fewer than 10: no held-out queries at all
    index = build_online_index(vectors)
    assert index.info["kind"] == "flat" and index.info["held_out_queries"] == 0
    assert index.search(vectors[2], 1)[1][0, 0] == 2
