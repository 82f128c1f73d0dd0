"""The document store beside a FAISS index: every document's tokens and vectors, by row id, memory-mapped.

Retrieval must attach the neighbours' *tokens* to each row (so training never needs random
access into other shards), and the diversity filter needs the neighbours' *vectors*. Both are
looked up by the index's row ids, from any Ray worker, so they live in ``.npy`` files that
workers open with ``mmap_mode="r"``: only the pages of the rows they touch are read.

    docs/documents.parquet   key, caption, source_shard (row id = position)
    docs/image_ids.npy       int16 [N, tokens_per_image]  VQ codes
    docs/text_ids.npy        int32 [total]  BPE ids, concatenated;  docs/text_offsets.npy int64 [N + 1]
    docs/image_vectors.npy   float16 [N, D]  CLIP image vectors (unit norm)
    docs/text_vectors.npy    float16 [N, D]  CLIP text vectors (unit norm)
    docs/vectors.npy         float16 [N, D]  document vectors: normalise(image + text)
    docs/store.json          N, shapes, the CLIP identity (written last: the commit marker)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cm3.core.files import atomic_folder

STORE_FILE = "store.json"


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


class DocStore:
    def __init__(self, folder: Path):
        folder = Path(folder)
        meta_path = folder / STORE_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{folder}: no {STORE_FILE}; the document store was not (fully) written")
        self.folder = folder
        self.meta = json.loads(meta_path.read_text())
        self.size = int(self.meta["n"])
        self.image_ids = np.load(folder / "image_ids.npy", mmap_mode="r")
        self.text_ids = np.load(folder / "text_ids.npy", mmap_mode="r")
        self.text_offsets = np.load(folder / "text_offsets.npy", mmap_mode="r")
        self.image_vectors = np.load(folder / "image_vectors.npy", mmap_mode="r")
        self.text_vectors = np.load(folder / "text_vectors.npy", mmap_mode="r")
        self.vectors = np.load(folder / "vectors.npy", mmap_mode="r")
        self.multimodal = np.ones(self.size, dtype=bool)  # every ingested row has an image and a caption

    def text(self, row: int) -> list[int]:
        return self.text_ids[self.text_offsets[row]: self.text_offsets[row + 1]].tolist()

    def documents(self, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.folder / "documents.parquet", columns=columns)


def write_doc_store(folder: Path, shards: list[Path], tokens_per_image: int, dim: int, identity: dict,
                    embed_missing: Callable[[pa.Table], tuple[np.ndarray, np.ndarray]] | None = None,
                    progress: Callable[[int], None] | None = None) -> DocStore:
    """Stream the token shards once into the store (rows in shard order, then row order).

    Rows whose shard has no CLIP columns get vectors from ``embed_missing(table) -> (image, text)``.
    """
    folder = Path(folder)
    with atomic_folder(folder) as staging:
        _write_store(staging, shards, tokens_per_image, dim, identity, embed_missing, progress)
    return DocStore(folder)


def _write_store(staging: Path, shards: list[Path], tokens_per_image: int, dim: int, identity: dict,
                 embed_missing: Callable[[pa.Table], tuple[np.ndarray, np.ndarray]] | None,
                 progress: Callable[[int], None] | None) -> None:
    counts = [pq.ParquetFile(path).metadata.num_rows for path in shards]
    n = sum(counts)
    image_ids = np.lib.format.open_memmap(staging / "image_ids.npy", "w+", np.int16, (n, tokens_per_image))
    vectors = {name: np.lib.format.open_memmap(staging / f"{name}.npy", "w+", np.float16, (n, dim))
               for name in ("image_vectors", "text_vectors", "vectors")}
    offsets = np.zeros(n + 1, dtype=np.int64)
    texts: list[np.ndarray] = []
    documents: list[pa.Table] = []
    row = 0
    for path in shards:
        table = pq.read_table(path)
        rows = table.num_rows
        if rows == 0:
            continue
        image_ids[row: row + rows] = np.asarray(table.column("image_ids").combine_chunks().flatten(),
                                                dtype=np.int16).reshape(rows, tokens_per_image)
        if "clip_image" in table.column_names:
            image = _matrix(table.column("clip_image"), dim)
            text = _matrix(table.column("clip_text"), dim)
        elif embed_missing is not None:
            image, text = embed_missing(table)
        else:
            raise ValueError(f"{path}: has no CLIP vectors (clip_image, clip_text) and no CLIP model was given "
                             "to compute them (--clip or --clip-model)")
        if image.shape[1] != dim:
            raise ValueError(f"{path}: CLIP vectors have dim {image.shape[1]}, expected {dim}")
        vectors["image_vectors"][row: row + rows] = image
        vectors["text_vectors"][row: row + rows] = text
        vectors["vectors"][row: row + rows] = normalise(normalise(image) + normalise(text))
        lengths = np.asarray(table.column("text_ids").combine_chunks().value_lengths(), dtype=np.int64)
        offsets[row + 1: row + rows + 1] = offsets[row] + np.cumsum(lengths)
        texts.append(np.asarray(table.column("text_ids").combine_chunks().flatten(), dtype=np.int32))
        documents.append(table.select(["key", "caption", "source_shard"]))
        row += rows
        if progress:
            progress(rows)
    if n == 0:
        raise ValueError("the token shards hold no documents: nothing to index")
    np.save(staging / "text_offsets.npy", offsets)
    np.save(staging / "text_ids.npy", np.concatenate(texts))
    for array in (image_ids, *vectors.values()):
        array.flush()
    pq.write_table(pa.concat_tables(documents), staging / "documents.parquet")
    meta = {"n": n, "tokens_per_image": tokens_per_image, "dim": dim, "clip": identity}
    (staging / STORE_FILE).write_text(json.dumps(meta, indent=2))


def _matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    flat = column.combine_chunks()
    if flat.null_count:
        raise ValueError(f"{flat.null_count} rows have no CLIP vector")
    return np.asarray(flat.flatten(), dtype=np.float32).reshape(-1, dim)
