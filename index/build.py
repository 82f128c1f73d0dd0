"""`cm3 build-index`: token shards -> document store + FAISS index -> retrieval-augmented shards.

1. ``write_doc_store``: every document's tokens and CLIP vectors by row id (memory-mapped), with
   the vectors from the token shards (computed in the tokenize pass), or computed here by a CLIP
   model for shards without them.
2. ``build_index``: the FAISS index chosen for the count, dimension and memory budget, tuned to the
   recall target, saved with the CLIP identity so queries embedded by another model are refused.
   With ``online``, also ``build_online_index`` beside it (``faiss_online/``): the index tuned for one
   query at a time, which ``load_for_search`` (``cm3 search``, ``Retriever``) prefers.
3. Retrieval over Ray Data: an actor pool opens the index and the store memory-mapped and picks
   each row's neighbours with the paper's filters (``select_neighbours``); the driver commits one
   augmented shard per token shard (``ShardAssembler``), so a killed run resumes per shard.

Augmented shard = the token shard's columns plus ``neighbour_keys`` (list<string>),
``neighbour_scores`` (list<float32>), ``neighbour_text_ids`` (list<list<int32>>: BPE ids) and
``neighbour_image_ids`` (list<fixed_size_list<int16>[tokens_per_image]>: VQ codes).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from cm3.core.errors import InputError
from cm3.core.files import write_json
from cm3.core.intact import parquet_metadata
from cm3.core.shards import clear_staging, complete_shards, foreign_output, parquet_path, read_stats
from cm3.index.doc_store import DocStore, normalise, write_doc_store
from cm3.index.retrieval import RetrievalSettings, drop_query_tokens, select_neighbours
from cm3.pipeline.shard_assembler import ShardAssembler
from cm3.pipeline.tokenize import read_tokens_config, recorded_tokenizer

DOCS_DIR = "docs"
FAISS_DIR = "faiss"  # the batch index: augmented shards
ONLINE_DIR = "faiss_online"  # the online index: one query at a time (optional)
REPORT_FILE = "build_report.json"


@dataclass(frozen=True)
class IndexSettings:
    memory_budget_bytes: int = 4 * 2**30
    recall_target: float = 0.95
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)
    seed: int = 0
    online: bool = False  # also build the online index (single-query latency) beside the batch one


def augmented_schema(token_schema: pa.Schema, tokens_per_image: int) -> pa.Schema:
    return token_schema.append(pa.field("neighbour_keys", pa.list_(pa.string()))) \
        .append(pa.field("neighbour_scores", pa.list_(pa.float32()))) \
        .append(pa.field("neighbour_text_ids", pa.list_(pa.list_(pa.int32())))) \
        .append(pa.field("neighbour_image_ids", pa.list_(pa.list_(pa.int16(), tokens_per_image))))


def check_build_inputs(tokens_dir: Path, clip: dict | None, index_dir: Path | None = None,
                       augmented_dir: Path | None = None) -> tuple[dict, list[int], dict]:
    """(token folder config, complete shard ids, the CLIP identity to use); errors before any work, including an
    ``index_dir`` whose indexes hold the documents of another tokenizer or the vectors of another CLIP model, and
    an ``augmented_dir`` that another stage wrote or whose shards come from another tokenizer."""
    config = read_tokens_config(tokens_dir)
    for folder, own, flag in ((index_dir, (FAISS_DIR, REPORT_FILE), "--index"), (augmented_dir, (), "--out")):
        if folder is not None and (other := foreign_output(Path(folder), own)) is not None:
            raise InputError(f"{folder}: holds {other}; choose another {flag} folder")
    if augmented_dir is not None and (recorded := recorded_tokenizer(Path(augmented_dir))) is not None \
            and recorded[0]["tokenizer_sha256"] != config["tokenizer_sha256"]:
        raise InputError(f"{augmented_dir}: holds augmented shards of tokenizer "
                         f"{recorded[0]['tokenizer_sha256'][:12]} (recorded in "
                         f"{recorded[1].name}), not of {tokens_dir}'s tokenizer {config['tokenizer_sha256'][:12]}; "
                         "choose another --out folder")
    shards = complete_shards(Path(tokens_dir))
    if not shards or sum(read_stats(tokens_dir, s).get("kept", 0) for s in shards) == 0:
        raise InputError(f"{tokens_dir}: no tokenized documents to index (empty data set)")
    for shard in shards:  # every footer whole before anything is written: a damaged shard is named here
        parquet_metadata(parquet_path(tokens_dir, shard))
    stored = config.get("clip")
    if stored is None and clip is None:
        raise InputError(f"{tokens_dir}: the token shards have no CLIP vectors and no CLIP model was given to "
                         "compute them (--clip DIR or --clip-model NAME)")
    if stored is not None and clip is not None and stored != clip:
        raise InputError(f"{tokens_dir}: the token shards' vectors come from CLIP {stored}, not {clip}; "
                         "vectors of two models cannot share one index")
    if index_dir is not None:
        from cm3.index.faiss_index import META_FILE, VectorIndex

        for folder in (Path(index_dir) / FAISS_DIR, Path(index_dir) / ONLINE_DIR):
            if (folder / META_FILE).is_file():
                check_index_source(folder, VectorIndex.read_record(folder)["metadata"], config["tokenizer_sha256"],
                                   stored or clip)
    return config, shards, stored or clip


def check_index_source(folder: Path, metadata: dict, tokenizer_sha256: str | None, clip: dict | None) -> None:
    """An index folder serves one document set: refuse an index whose documents came from another tokenizer
    (their VQ and BPE ids would mean other things) or whose vectors came from another CLIP model."""
    if metadata.get("tokenizer_sha256") != tokenizer_sha256:
        raise InputError(f"{folder}: indexes documents of another tokenizer (tokenizer_sha256 "
                         f"{str(metadata.get('tokenizer_sha256'))[:12]} != {str(tokenizer_sha256)[:12]}); "
                         "choose another --index folder")
    if metadata.get("clip") != clip:
        raise InputError(f"{folder}: holds vectors of CLIP {metadata.get('clip')}, not {clip}; vectors of two "
                         "models cannot share one index folder; choose another --index folder")


def _embed_from_raw(raw_dir: Path, identity: dict):
    """For shards without vectors: CLIP over the raw JPEGs (by key) and the captions."""
    import io

    from PIL import Image

    from cm3.tokenizers.clip_embedder import ClipEmbedder

    embedder = ClipEmbedder(identity["model_name"], identity["pretrained"])

    def embed(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        shard = int(table.column("source_shard")[0].as_py())
        raw = pq.read_table(parquet_path(raw_dir, shard), columns=["key", "jpg"])
        jpg_by_key = dict(zip(raw.column("key").to_pylist(), raw.column("jpg").to_pylist()))
        images = [Image.open(io.BytesIO(jpg_by_key[key])).convert("RGB") for key in table.column("key").to_pylist()]
        return embedder.embed_images(images), embedder.embed_texts([c or "" for c in table.column("caption").to_pylist()])

    return embed, embedder.dim


class RetrieveBatch:
    """Ray Data actor: neighbours for a batch of token rows, with their tokens attached."""

    def __init__(self, index_dir: str, settings: RetrievalSettings, clip: dict | None, seed: int):
        from cm3.index.faiss_index import VectorIndex

        self.index = VectorIndex.load(Path(index_dir) / FAISS_DIR, mmap=True, threads=1)
        self.store = DocStore(Path(index_dir) / DOCS_DIR)
        keys = self.store.documents(["key"]).column("key").to_pylist()
        self.row_of = {key: row for row, key in enumerate(keys)}
        self.keys = keys
        self.settings = settings
        self.rng = np.random.default_rng(seed)
        self.embedder = None
        if settings.query_dropout > 0:
            from cm3.tokenizers.clip_embedder import ClipEmbedder

            self.embedder = ClipEmbedder(clip["model_name"], clip["pretrained"])

    def _queries(self, rows: list[int], captions: list[str]) -> np.ndarray:
        if self.embedder is None:
            return np.asarray(self.store.vectors[rows], dtype=np.float32)
        dropped = [drop_query_tokens(c or "", self.settings.query_dropout, self.rng) for c in captions]
        text = self.embedder.embed_texts(dropped)
        return normalise(normalise(np.asarray(self.store.image_vectors[rows], np.float32)) + text)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.row_of[key] for key in batch.column("key").to_pylist()]
        scores, ids = self.index.search(self._queries(rows, batch.column("caption").to_pylist()),
                                        self.settings.candidates)
        keys, chosen_scores, texts, images = [], [], [], []
        for row, row_scores, row_ids in zip(rows, scores, ids):
            chosen, kept_scores = select_neighbours(row, row_ids, row_scores, self.store.vectors,
                                                    self.store.multimodal, self.settings)
            keys.append([self.keys[c] for c in chosen])
            chosen_scores.append(kept_scores)
            texts.append([self.store.text(c) for c in chosen])
            images.append([np.asarray(self.store.image_ids[c]).tolist() for c in chosen])
        tokens = self.store.meta["tokens_per_image"]
        return batch.append_column("neighbour_keys", pa.array(keys, pa.list_(pa.string()))) \
            .append_column("neighbour_scores", pa.array(chosen_scores, pa.list_(pa.float32()))) \
            .append_column("neighbour_text_ids", pa.array(texts, pa.list_(pa.list_(pa.int32())))) \
            .append_column("neighbour_image_ids", pa.array(images, pa.list_(pa.list_(pa.int16(), tokens)))) \
            .append_column("error", pa.nulls(batch.num_rows, pa.string()))


def run_build_index(tokens_dir: Path, index_dir: Path, augmented_dir: Path, *, clip: dict | None = None,
                    settings: IndexSettings = IndexSettings(), actors: int | None = None,
                    progress: bool = True) -> dict:
    """Build (or reuse) the store and index in ``index_dir``, then write augmented shards (needs Ray)."""
    import ray

    from cm3.index.faiss_index import META_FILE, VectorIndex, build_index
    from cm3.index.online_index import build_online_index

    tokens_dir, index_dir, augmented_dir = Path(tokens_dir), Path(index_dir), Path(augmented_dir)
    config, shards, identity = check_build_inputs(tokens_dir, clip, index_dir, augmented_dir)
    tokens_per_image = int(config["tokens_per_image"])
    started = time.time()
    vectors = None
    if not (index_dir / FAISS_DIR / META_FILE).exists():
        embed, dim = (None, int(config["clip_dim"])) if config.get("clip") else _embed_from_raw(
            Path(config["raw_dir"]), identity)
        with tqdm(desc="documents", unit="doc", disable=not progress) as bar:
            store = write_doc_store(index_dir / DOCS_DIR, [parquet_path(tokens_dir, s) for s in shards],
                                    tokens_per_image, dim, identity, embed_missing=embed, progress=bar.update)
        vectors = np.asarray(store.vectors, dtype=np.float32)
        metadata = {"clip": identity, "tokens_dir": str(tokens_dir.resolve()), "raw_dir": config.get("raw_dir"),
                    "tokenizer_sha256": config["tokenizer_sha256"]}
        built = build_index(vectors, np.arange(len(vectors), dtype=np.int64),
                            memory_budget_bytes=settings.memory_budget_bytes, recall_target=settings.recall_target,
                            seed=settings.seed, metadata=metadata, progress=progress)
        built.save(index_dir / FAISS_DIR)
    index_info = VectorIndex.read_record(index_dir / FAISS_DIR)
    if settings.online and not (index_dir / ONLINE_DIR / META_FILE).exists():
        if vectors is None:
            vectors = np.asarray(DocStore(index_dir / DOCS_DIR).vectors, dtype=np.float32)
        online = build_online_index(vectors, np.arange(len(vectors), dtype=np.int64),
                                    memory_budget_bytes=settings.memory_budget_bytes,
                                    recall_target=settings.recall_target, seed=settings.seed,
                                    metadata=index_info["metadata"], progress=progress)
        online.save(index_dir / ONLINE_DIR)
    del vectors
    online_info = VectorIndex.read_record(index_dir / ONLINE_DIR) if (index_dir / ONLINE_DIR / META_FILE).exists() \
        else None
    index_seconds = time.time() - started

    done = set(complete_shards(augmented_dir)) if augmented_dir.exists() else set()
    augmented_dir.mkdir(parents=True, exist_ok=True)
    clear_staging(augmented_dir)
    expected = {s: pq.ParquetFile(parquet_path(tokens_dir, s)).metadata.num_rows
                for s in shards if s not in done}
    token_schema = pq.read_schema(parquet_path(tokens_dir, shards[0]))
    assembler = ShardAssembler(augmented_dir, expected, augmented_schema(token_schema, tokens_per_image),
                               {"retrieval": asdict(settings.retrieval),
                                **{k: config[k] for k in ("tokenizer_sha256", "tokenizer_content_sha256")
                                   if k in config}})
    for shard_id in [s for s, count in expected.items() if count == 0]:
        assembler.commit(shard_id)
    pending = [s for s, count in expected.items() if count > 0]
    retrieval_started = time.time()
    if pending:
        actors = actors or max(1, int(ray.cluster_resources().get("CPU", 1) // 2))
        # One block per token shard, so augmented shards commit as they finish (see run_tokenize).
        dataset = ray.data.read_parquet([str(parquet_path(tokens_dir, s)) for s in pending],
                                        override_num_blocks=len(pending)).map_batches(
            RetrieveBatch,
            fn_constructor_kwargs={"index_dir": str(index_dir.resolve()), "settings": settings.retrieval,
                                   "clip": identity, "seed": settings.seed},
            batch_size=256, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
        )
        with tqdm(total=sum(expected[s] for s in pending), desc="retrieve", unit="doc", disable=not progress) as bar:
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                bar.update(assembler.add(batch))
    clear_staging(augmented_dir)
    if assembler.missing():
        raise RuntimeError(f"build-index: shards {assembler.missing()} did not receive all their rows; run again")
    report = {
        "documents": DocStore(index_dir / DOCS_DIR).size,
        "index": index_info,
        "online_index": online_info,
        "clip": identity,
        "augmented_shards_written": len(assembler.written),
        "augmented_shards_skipped_complete": len(done),
        "index_seconds": round(index_seconds, 2),
        "retrieval_seconds": round(time.time() - retrieval_started, 2),
        "retrieval": asdict(settings.retrieval),
    }
    write_json(index_dir / REPORT_FILE, report)
    return report


def load_for_search(index_dir: Path, clip: dict | None = None):
    """(VectorIndex, DocStore, the CLIP identity): the online index when the folder has one, else the batch one.
    Refuses a query model other than the index's, and an online index built from another tokenizer's documents
    or another CLIP's vectors than the folder's batch index."""
    from cm3.index.faiss_index import META_FILE, VectorIndex

    index_dir = Path(index_dir)
    batch = VectorIndex.read_record(index_dir / FAISS_DIR)["metadata"]
    if (index_dir / ONLINE_DIR / META_FILE).is_file():
        index = VectorIndex.load(index_dir / ONLINE_DIR)
        check_index_source(index_dir / ONLINE_DIR, index.metadata, batch.get("tokenizer_sha256"), batch.get("clip"))
    else:
        index = VectorIndex.load(index_dir / FAISS_DIR)
    stored = index.metadata.get("clip")
    if clip is not None and clip != stored:
        raise InputError(f"{index_dir}: built with CLIP {stored}; the query model {clip} would give vectors "
                         "from another space")
    return index, DocStore(Path(index_dir) / DOCS_DIR), stored
