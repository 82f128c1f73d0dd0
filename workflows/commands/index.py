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
    """
    from cm3.index.build import IndexSettings, check_build_inputs, run_build_index
    from cm3.index.retrieval import RetrievalSettings
    from cm3.workflows.ray_session import connect

    identity = clip_identity(clip, clip_model, clip_pretrained)
    try:
        retrieval = RetrievalSettings(k=k, max_similarity=max_similarity, query_dropout=query_dropout,
                                      candidates=max(INDEX.retrieval.candidates, 8 * k + 1))
        check_build_inputs(tokens, identity)
    except (InputError, ValueError) as err:
        fail(str(err))
    settings = IndexSettings(memory_budget_bytes=parse_bytes(memory_budget), recall_target=recall_target,
                             retrieval=retrieval)
    connect(ray_address)
    try:
        report = run_build_index(tokens, index, out, clip=identity, settings=settings, progress=progress)
    except (InputError, ValueError) as err:
        fail(str(err))
    info = report["index"]
    typer.echo(f"index: {report['documents']} documents, {info.get('kind')} ({info.get('factory')}), "
               f"recall@{info.get('k', 10)} {info.get('recall', float('nan')):.3f}; "
               f"augmented shards: {report['augmented_shards_written']} written, "
               f"{report['augmented_shards_skipped_complete']} already complete")


def search(
    query: Optional[str] = typer.Argument(None, help="Text to search for."),
    index: Path = typer.Option(..., "--index", help="Folder written by cm3 build-index."),
    image: Optional[Path] = typer.Option(None, help="Search with an image instead of (or with) text."),
    k: int = typer.Option(5, "-k", "--k", min=1, help="How many neighbours to show."),
    sheet: Optional[Path] = typer.Option(None, help="Also write a contact sheet PNG of the results."),
) -> None:
    """Show a text or image query's nearest documents (key, caption, score).

    Examples:

      cm3 search "a red circle" --index data/index

      cm3 search --image query.png --index data/index -k 8 --sheet results.png
    """
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from cm3.core.shards import parquet_path
    from cm3.index.build import load_for_search
    from cm3.tokenizers.clip_embedder import ClipEmbedder
    from cm3.workflows.report import image_grid

    if query is None and image is None:
        fail("give a text query, --image PATH, or both")
    if image is not None and not image.is_file():
        fail(f"{image}: no such image file")
    try:
        vector_index, store, identity = load_for_search(index)
    except (FileNotFoundError, InputError) as err:
        fail(str(err))
    embedder = ClipEmbedder(identity["model_name"], identity["pretrained"])
    picture = Image.open(image).convert("RGB") if image is not None else None
    vector = embedder.embed_documents([picture], [query])
    scores, ids = vector_index.search(vector, k)
    documents = store.documents(["key", "caption", "source_shard"])
    hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
    for row, score in hits:
        typer.echo(f"{score:.3f}\t{documents.column('key')[row].as_py()}\t{documents.column('caption')[row].as_py()}")
    if sheet is not None:
        raw_dir = Path(vector_index.metadata.get("raw_dir") or "")
        pictures, captions = [], []
        for row, score in hits:
            key, shard = documents.column("key")[row].as_py(), documents.column("source_shard")[row].as_py()
            table = pq.read_table(parquet_path(raw_dir, shard), columns=["key", "jpg"],
                                  filters=[("key", "=", key)])
            pictures.append(Image.open(io.BytesIO(table.column("jpg")[0].as_py())))
            captions.append(f"{score:.2f} {documents.column('caption')[row].as_py()}")
        image_grid(pictures, captions, cols=min(4, len(pictures))).save(sheet)
        typer.echo(f"contact sheet: {sheet}")
