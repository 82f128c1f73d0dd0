"""`cm3 build-index` and `cm3 search` on a real Ray cluster with real FAISS and OpenCLIP (a fixed tiny model)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cm3.core.shards import complete_shards, parquet_path
from cm3.index.build import DOCS_DIR, FAISS_DIR
from cm3.index.doc_store import DocStore
from cm3.index.faiss_index import VectorIndex

from conftest import cm3
from factories import TINY_F32, captions, make_tokenizer, save_random_clip, write_raw_shards


@pytest.fixture(scope="module")
def corpus(ray_cluster, tmp_path_factory):
    """Raw shards -> token shards with CLIP vectors (tokenize pass), and the same without vectors."""
    root = tmp_path_factory.mktemp("corpus")
    write_raw_shards(root / "raw", shards=3, rows=12)
    make_tokenizer(root / "tok", TINY_F32, captions())
    clip = save_random_clip(root / "clip.safetensors")
    common = ["--tokenizer", str(root / "tok"), "--ray-address", ray_cluster.address, "--no-progress"]
    cm3("tokenize", str(root / "raw"), "--out", str(root / "tokens"), "--clip-model", clip["model_name"],
        "--clip-pretrained", clip["pretrained"], *common, check=True, timeout=600)
    cm3("tokenize", str(root / "raw"), "--out", str(root / "plain"), *common, check=True, timeout=600)
    return root, clip


def test_augmented_shards_carry_filtered_neighbours_with_their_tokens(corpus, ray_cluster):
    root, clip = corpus
    proc = cm3("build-index", str(root / "tokens"), "--index", str(root / "index"), "--out", str(root / "aug"),
               "--ray-address", ray_cluster.address, "--no-progress", check=True, timeout=600)
    assert "36 documents" in proc.stdout

    index = VectorIndex.load(root / "index" / FAISS_DIR)
    assert index.metadata["clip"] == clip and len(index) == 36
    store = DocStore(root / "index" / DOCS_DIR)
    tokens = {row["key"]: row for s in range(3)
              for row in pq.read_table(parquet_path(root / "tokens", s)).to_pylist()}
    rows = [row for s in complete_shards(root / "aug")
            for row in pq.read_table(parquet_path(root / "aug", s)).to_pylist()]
    assert len(rows) == 36
    vectors = {key: np.asarray(store.vectors[i], np.float32)
               for i, key in enumerate(store.documents(["key"]).column("key").to_pylist())}
    for row in rows:
        assert row["key"] not in row["neighbour_keys"]
        assert 1 <= len(row["neighbour_keys"]) <= 2
        assert all(score <= 0.9 + 1e-6 for score in row["neighbour_scores"])
        for key, text_ids, image_ids in zip(row["neighbour_keys"], row["neighbour_text_ids"],
                                            row["neighbour_image_ids"]):
            assert text_ids == tokens[key]["text_ids"] and image_ids == tokens[key]["image_ids"]
        if len(row["neighbour_keys"]) == 2:
            a, b = (vectors[k] for k in row["neighbour_keys"])
            assert float(a @ b) <= 0.9 + 2e-3  # float16 storage
        for key, score in zip(row["neighbour_keys"], row["neighbour_scores"]):
            assert score == pytest.approx(float(vectors[row["key"]] @ vectors[key]), abs=2e-2)

    report = json.loads((root / "index" / "build_report.json").read_text())
    assert report["documents"] == 36 and report["index"]["kind"] == "flat"

    again = cm3("build-index", str(root / "tokens"), "--index", str(root / "index"), "--out", str(root / "aug"),
                "--ray-address", ray_cluster.address, "--no-progress", check=True, timeout=600)
    assert "0 written, 3 already complete" in again.stdout

    search = cm3("search", "a small red circle", "--index", str(root / "index"), "-k", "3",
                 "--sheet", str(root / "sheet.png"), check=True)
    lines = [line for line in search.stdout.splitlines() if "\t" in line]
    assert len(lines) == 3 and all(line.split("\t")[1] in tokens for line in lines)
    scores = [float(line.split("\t")[0]) for line in lines]
    assert scores == sorted(scores, reverse=True)
    assert Image.open(root / "sheet.png").width == 3 * 192


def test_generate_prepends_retrieved_documents_and_reranks_by_clip(corpus, tmp_path):
    root, _ = corpus  # the index of the first test
    cm3("model", "init", "--tokenizer", str(root / "tok"), "--out", str(tmp_path / "ckpt"), "--preset", "tiny",
        check=True)
    out = tmp_path / "gen" / "grid.png"
    proc = cm3("generate", "a small red circle", "--checkpoint", str(tmp_path / "ckpt"), "--index",
               str(root / "index"), "-n", "2", "--rerank", "--out", str(out), check=True)
    assert "2 images" in proc.stdout
    assert [Image.open(out.with_name(f"grid_{i}.png")).size for i in range(2)] == [(256, 256)] * 2
    refused = cm3("generate", "a red circle", "--checkpoint", str(tmp_path / "ckpt"), "--rerank")
    assert refused.returncode == 2 and "--index" in refused.stderr


def test_shards_without_vectors_get_them_from_a_given_clip(corpus, ray_cluster):
    root, clip = corpus
    missing = cm3("build-index", str(root / "plain"), "--index", str(root / "i2"), "--out", str(root / "a2"),
                  "--ray-address", ray_cluster.address)
    assert missing.returncode == 2 and "no CLIP vectors" in missing.stderr and not (root / "i2").exists()

    cm3("build-index", str(root / "plain"), "--index", str(root / "i2"), "--out", str(root / "a2"),
        "--clip-model", clip["model_name"], "--clip-pretrained", clip["pretrained"],
        "--ray-address", ray_cluster.address, "--no-progress", check=True, timeout=600)
    # vectors computed here from the raw JPEGs match the ones the tokenize pass computed
    from_tokenize = np.asarray(DocStore(root / "index" / DOCS_DIR).vectors, np.float32)
    from_build = np.asarray(DocStore(root / "i2" / DOCS_DIR).vectors, np.float32)
    assert np.abs(from_tokenize - from_build).max() < 2e-2


def test_bad_inputs_are_refused(corpus, ray_cluster, tmp_path):
    root, clip = corpus
    other = save_random_clip(tmp_path / "other.safetensors", model_name="cm3-clip-tiny")
    proc = cm3("build-index", str(root / "tokens"), "--index", str(tmp_path / "i"), "--out", str(tmp_path / "a"),
               "--clip-model", other["model_name"], "--clip-pretrained", other["pretrained"])
    assert proc.returncode == 2 and "cannot share one index" in proc.stderr

    empty = tmp_path / "empty_tokens"
    empty.mkdir()
    (empty / "tokenize_config.json").write_text((root / "tokens" / "tokenize_config.json").read_text())
    proc = cm3("build-index", str(empty), "--index", str(tmp_path / "i"), "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and "empty data set" in proc.stderr

    index = VectorIndex.load(root / "index" / FAISS_DIR)
    with pytest.raises(ValueError, match="does not match the index dim"):
        index.search(np.ones((1, index.dim + 1), np.float32), 2)

    proc = cm3("search", "a red circle", "--index", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "index.json" in proc.stderr


def test_online_index_answers_cm3_search_and_the_retriever_alike(corpus, ray_cluster, tmp_path):
    from cm3.index.build import ONLINE_DIR
    from cm3.index.online_index import build_online_index, online_candidates
    from cm3.index.query import Retriever

    root, _ = corpus  # the index and augmented shards of the first test: only the online index is new
    proc = cm3("build-index", str(root / "tokens"), "--index", str(root / "index"), "--out", str(root / "aug"),
               "--online", "--ray-address", ray_cluster.address, "--no-progress", check=True, timeout=600)
    assert "0 written, 3 already complete" in proc.stdout and "online index: Flat" in proc.stdout
    record = VectorIndex.read_record(root / "index" / ONLINE_DIR)
    assert record["workload"] == "online" and record["recall_at_k"] == 1.0 and record["latency_ms_p50"] > 0
    assert record["metadata"] == VectorIndex.read_record(root / "index" / FAISS_DIR)["metadata"]

    # a graph instead of exact search (36 documents would never get one by themselves), in a copy of the folder
    folder = tmp_path / "index"
    shutil.copytree(root / "index", folder)
    store = DocStore(folder / DOCS_DIR)
    graph = online_candidates(1_000, store.meta["dim"])[0]
    build_online_index(np.asarray(store.vectors, np.float32), candidates=[graph],
                       metadata=record["metadata"]).save(folder / ONLINE_DIR)
    retriever = Retriever(folder)
    assert retriever.index.info["workload"] == "online" and retriever.index.info["kind"] == "hnsw"
    keys = store.documents(["key"]).column("key").to_pylist()
    expected = [(keys[row], score) for row, score in retriever.nearest("a small red circle", k=4)]
    search = cm3("search", "a small red circle", "--index", str(folder), "-k", "4", check=True)
    shown = [line.split("\t") for line in search.stdout.splitlines() if "\t" in line]
    assert [key for _, key, _ in shown] == [key for key, _ in expected] and len(expected) == 4
    assert [float(score) for score, _, _ in shown] == pytest.approx([s for _, s in expected], abs=1e-3)


def test_an_index_folder_of_another_tokenizer_or_clip_is_refused(corpus, tmp_path):
    from cm3.index.build import ONLINE_DIR
    from cm3.index.online_index import build_online_index
    from cm3.index.query import Retriever
    from cm3.core.errors import InputError

    root, _ = corpus  # the index of the first test, copied, with an online index
    folder = tmp_path / "index"
    shutil.copytree(root / "index", folder, ignore=shutil.ignore_patterns(ONLINE_DIR))
    metadata = VectorIndex.read_record(folder / FAISS_DIR)["metadata"]
    build_online_index(np.asarray(DocStore(folder / DOCS_DIR).vectors, np.float32),
                       metadata=metadata).save(folder / ONLINE_DIR)
    assert Retriever(folder).index.info["workload"] == "online"
    config = json.loads((root / "tokens" / "tokenize_config.json").read_text())
    for field, value, message in [("tokenizer_sha256", "0" * 64, "another tokenizer"),
                                  ("clip", {"model_name": "ViT-B-32", "pretrained": None}, "holds vectors of CLIP")]:
        tokens = tmp_path / f"tokens-{field}"
        shutil.copytree(root / "tokens", tokens)
        (tokens / "tokenize_config.json").write_text(json.dumps({**config, field: value}))
        proc = cm3("build-index", str(tokens), "--index", str(folder), "--out", str(tmp_path / "aug"), "--online")
        assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "aug").exists()

    # an online index whose vectors came from another CLIP than the folder's batch index and store
    online = VectorIndex.load(folder / ONLINE_DIR, mmap=False)
    VectorIndex(online.index, online.ids, online.info,
                {**metadata, "clip": {"model_name": "ViT-B-32", "pretrained": None}}).save(folder / ONLINE_DIR)
    proc = cm3("search", "a red circle", "--index", str(folder))
    assert proc.returncode == 2 and "holds vectors of CLIP" in proc.stderr
    with pytest.raises(InputError, match="holds vectors of CLIP"):
        Retriever(folder)
