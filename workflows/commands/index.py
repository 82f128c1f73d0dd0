"""Commands for the retrieval index: build it, search it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cm3.core.errors import InputError
from cm3.index.build import IndexSettings
from cm3.workflows.commands.common import (
    CLIP_DIR_HELP,
    CLIP_MODEL_HELP,
    CLIP_PRETRAINED_HELP,
    clip_identity,
    fail,
    memory_size_text,
    parse_bytes,
)

INDEX = IndexSettings()  # the defaults of `cm3 build-index`


def build_index_command(
    tokens: Path = typer.Argument(..., help="Token shards folder (cm3 tokenize / cm3 ingest --tokenizer)."),
    index: Path = typer.Option(..., "--index", help="Folder for the FAISS index and the document store."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the retrieval-augmented shards."),
    k: int = typer.Option(INDEX.retrieval.k, min=0, help="Neighbours per document (the paper's default is 2)."),
    max_similarity: float = typer.Option(INDEX.retrieval.max_similarity,
                                         help="Skip candidates more similar than this to the query or a chosen one."),
    query_dropout: float = typer.Option(INDEX.retrieval.query_dropout, help="Drop this share of the query's words "
                                        "before embedding (0.2 in training)."),
    memory_budget: str = typer.Option(memory_size_text(INDEX.memory_budget_bytes),
                                      help="Memory the index may use; picks Flat/HNSW/IVF/IVF-PQ."),
    recall_target: float = typer.Option(INDEX.recall_target,
                                        help="Recall@10 against exact search the tuning must reach."),
    online: bool = typer.Option(False, "--online", help="Also build the online index (tuned for one query at a "
                                "time: cm3 search, cm3 generate --index, serving) beside the batch one."),
    clip: Optional[Path] = typer.Option(None, help=CLIP_DIR_HELP + " Needed when the shards have no vectors."),
    clip_model: Optional[str] = typer.Option(None, help=CLIP_MODEL_HELP),
    clip_pretrained: Optional[str] = typer.Option(None, help=CLIP_PRETRAINED_HELP),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join; default: start a local one."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Index the documents' CLIP vectors with FAISS and give every document its retrieved neighbours.

    Examples:

      cm3 build-index data/tokens --index data/index --out data/augmented

      cm3 build-index data/tokens --index data/index --out data/augmented --k 3 --memory-budget 16GB

      cm3 build-index data/tokens --index data/index --out data/augmented --online
    """
    from cm3.index.build import IndexSettings, check_build_inputs, run_build_index
    from cm3.index.retrieval import RetrievalSettings
    from cm3.workflows.ray_session import connect

    identity = clip_identity(clip, clip_model, clip_pretrained)
    try:
        retrieval = RetrievalSettings(k=k, max_similarity=max_similarity, query_dropout=query_dropout,
                                      candidates=max(INDEX.retrieval.candidates, 8 * k + 1))
        check_build_inputs(tokens, identity, index, out)
    except (InputError, ValueError) as err:
        fail(str(err))
    settings = IndexSettings(memory_budget_bytes=parse_bytes(memory_budget), recall_target=recall_target,
                             retrieval=retrieval, online=online)
    connect(ray_address)
    try:
        report = run_build_index(tokens, index, out, clip=identity, settings=settings, progress=progress)
    except (InputError, ValueError) as err:
        fail(str(err))
    info, online_info = report["index"], report["online_index"]
    typer.echo(f"index: {report['documents']} documents, {info['kind']} ({info['factory']}), "
               f"recall@{info['k']} {info['recall_at_k']:.3f}; "
               f"augmented shards: {report['augmented_shards_written']} written, "
               f"{report['augmented_shards_skipped_complete']} already complete")
    if online_info is not None:
        typer.echo(f"online index: {online_info['factory']} {online_info['search_params']}, recall@{online_info['k']}"
                   f" {online_info['recall_at_k']:.3f}, one query p50 {online_info['latency_ms_p50']:.2f} ms,"
                   f" p99 {online_info['latency_ms_p99']:.2f} ms")


def search(
    query: Optional[str] = typer.Argument(None, help="Text to search for."),
    index: Path = typer.Option(..., "--index", help="Folder written by cm3 build-index."),
    image: Optional[Path] = typer.Option(None, help="Search with an image instead of (or with) text."),
    k: int = typer.Option(5, "-k", "--k", min=1, help="How many neighbours to show."),
    sheet: Optional[Path] = typer.Option(None, help="Also write a contact sheet PNG of the results."),
) -> None:
    """Show a text or image query's nearest documents (score, key, caption), from the online index if built.

    Examples:

      cm3 search "a red circle" --index data/index

      cm3 search --image query.png --index data/index -k 8 --sheet results.png
    """
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from cm3.core.shards import parquet_path
    from cm3.index.query import Retriever
    from cm3.workflows.report import image_grid

    if query is None and image is None:
        fail("give a text query, --image PATH, or both")
    if image is not None and not image.is_file():
        fail(f"{image}: no such image file")
    try:
        retriever = Retriever(index)
    except (FileNotFoundError, InputError) as err:
        fail(str(err))
    picture = Image.open(image).convert("RGB") if image is not None else None
    hits = retriever.nearest(query, picture, k)
    documents = retriever.store.documents(["key", "caption", "source_shard"])
    for row, score in hits:
        typer.echo(f"{score:.3f}\t{documents.column('key')[row].as_py()}\t{documents.column('caption')[row].as_py()}")
    if sheet is not None:
        raw_dir = Path(retriever.index.metadata.get("raw_dir") or "")
        pictures, captions = [], []
        for row, score in hits:
            key, shard = documents.column("key")[row].as_py(), documents.column("source_shard")[row].as_py()
            table = pq.read_table(parquet_path(raw_dir, shard), columns=["key", "jpg"],
                                  filters=[("key", "=", key)])
            pictures.append(Image.open(io.BytesIO(table.column("jpg")[0].as_py())))
            captions.append(f"{score:.2f} {documents.column('caption')[row].as_py()}")
        image_grid(pictures, captions, cols=min(4, len(pictures))).save(sheet)
        typer.echo(f"contact sheet: {sheet}")
