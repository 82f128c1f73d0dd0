"""Commands that move data: ingest, tokenize, the demo data set and the end-to-end demo."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cm3.core.errors import InputError
from cm3.pipeline.download import DownloadSettings
from cm3.pipeline.tokenize import TokenizeSettings
from cm3.pipeline.url_list import FORMATS
from cm3.workflows.commands.common import (
    CLIP_DIR_HELP,
    CLIP_MODEL_HELP,
    CLIP_PRETRAINED_HELP,
    clip_identity,
    fail,
)

DOWNLOAD = DownloadSettings()  # the defaults of `cm3 ingest`
TOKENIZE = TokenizeSettings()  # the defaults of `cm3 tokenize`


def ingest(
    urls: Path = typer.Argument(..., help="URL list: .parquet, .csv, .tsv, .jsonl or .txt (one URL per line)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for raw shards, their stats and the run summary."),
    input_format: Optional[str] = typer.Option(None, help=f"Input format when the suffix does not say: {', '.join(FORMATS)}."),
    url_col: Optional[str] = typer.Option(None, help="URL column (default: the first of url, URL, image_url)."),
    caption_col: Optional[str] = typer.Option(None, help="Caption column (default: the first of caption, TEXT, text)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join (host:port or 'auto'); default: start a local one."),
    processes: Optional[int] = typer.Option(None, min=1, help="Shards downloaded at once (default: the cluster's CPUs)."),
    threads: int = typer.Option(DOWNLOAD.thread_count, min=1, help="Download threads per shard."),
    cpus_per_task: float = typer.Option(DOWNLOAD.cpus_per_task, min=0.01,
                                        help="Ray CPUs reserved by each shard task."),
    shard_rows: int = typer.Option(DOWNLOAD.shard_rows, min=1, help="URLs per shard (bounds shard size and memory)."),
    image_size: int = typer.Option(DOWNLOAD.image_size, min=8, help="Output side in pixels (center crop)."),
    resize_mode: str = typer.Option(DOWNLOAD.resize_mode,
                                    help="img2dataset resize mode: center_crop, border, keep_ratio, no."),
    timeout: float = typer.Option(DOWNLOAD.timeout, min=0.1, help="Seconds before a download times out."),
    retries: int = typer.Option(DOWNLOAD.retries, min=0, help="Extra tries per URL inside a shard."),
    max_shard_retry: int = typer.Option(DOWNLOAD.max_shard_retry, min=0,
                                        help="Times Ray re-runs a shard task that failed."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Also re-download the rows that failed in complete shards."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer folder: also tokenize the shards (see cm3 tokenize)."),
    tokens_out: Optional[Path] = typer.Option(None, help="Token shards folder (default: OUT_tokens beside OUT)."),
    clip: Optional[Path] = typer.Option(None, help=CLIP_DIR_HELP),
    clip_model: Optional[str] = typer.Option(None, help=CLIP_MODEL_HELP),
    clip_pretrained: Optional[str] = typer.Option(None, help=CLIP_PRETRAINED_HELP),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Download image-caption pairs with img2dataset on Ray, center-cropped to 256x256, into Parquet shards.

    Re-running the same command resumes: complete shards are skipped, half-written ones redone.

    Examples:

      cm3 ingest urls.parquet --out data/raw

      cm3 ingest laion_part0.parquet --url-col URL --caption-col TEXT --out data/raw --ray-address auto

      cm3 ingest urls.jsonl --out data/raw --retry-failed

      cm3 ingest urls.parquet --out data/raw --tokenizer tokenizer/ --tokens-out data/tokens
    """
    from cm3.pipeline.download import check_output_folder, run_download
    from cm3.pipeline.summary import format_summary
    from cm3.pipeline.tokenize import check_tokenizer_folder, check_tokens_out, run_tokenize
    from cm3.pipeline.url_list import open_url_list
    from cm3.workflows.ray_session import connect

    settings = DownloadSettings(
        shard_rows=shard_rows,
        image_size=image_size,
        resize_mode=resize_mode,
        timeout=timeout,
        retries=retries,
        thread_count=threads,
        cpus_per_task=cpus_per_task,
        max_shard_retry=max_shard_retry,
    )
    try:
        spec = open_url_list(urls, input_format, url_col, caption_col)
        check_output_folder(out, spec, settings)
        if tokenizer is not None:
            check_tokenizer_folder(tokenizer)
            check_tokens_out(tokens_out or out.with_name(out.name + "_tokens"))
    except InputError as err:
        fail(str(err))
    if resize_mode not in ("center_crop", "border", "keep_ratio", "keep_ratio_largest", "no"):
        fail(f"--resize-mode {resize_mode!r}: expected center_crop, border, keep_ratio, keep_ratio_largest or no")
    identity = clip_identity(clip, clip_model, clip_pretrained)
    if identity is not None and tokenizer is None:
        fail("CLIP vectors are computed in the tokenize pass: give --tokenizer too")

    import ray

    connect(ray_address)
    fits = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_task))
    workers = processes or fits
    if workers > fits:
        typer.echo(f"warning: --processes {workers} but the cluster fits {fits} tasks of {cpus_per_task} CPU; "
                   f"only {fits} shards will download at once (lower --cpus-per-task to run more)", err=True)
    result = run_download(spec, out, settings, processes=workers, retry_failed=retry_failed, progress=progress)
    typer.echo(format_summary(result.summary))
    typer.echo(f"summary: {out / 'ingest_summary.json'}")
    if result.shards_failed:
        fail(f"{len(result.shards_failed)} shard(s) failed; run the same command again to retry them", code=1)
    if tokenizer is not None:
        tokens_dir = tokens_out or out.with_name(out.name + "_tokens")
        tokenized = run_tokenize(out, tokens_dir, tokenizer, clip=identity, progress=progress)
        echo_tokenize_result(tokenized, tokens_dir)


def echo_tokenize_result(result, tokens_dir: Path) -> None:
    typer.echo(f"token shards in {tokens_dir}: {len(result.shards_written)} written, "
               f"{result.shards_skipped_complete} already complete; "
               f"{result.rows_tokenized} images tokenized in {result.seconds:.1f} s")
    if result.skipped_by_reason:
        typer.echo("skipped: " + ", ".join(f"{reason}: {n}" for reason, n in result.skipped_by_reason.items()))


def tokenize(
    raw: Path = typer.Argument(..., help="Raw shards folder written by cm3 ingest."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for token shards."),
    tokenizer: Path = typer.Option(..., help="Tokenizer folder (cm3 tokenizer build)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join; default: start a local one."),
    batch_size: int = typer.Option(TOKENIZE.batch_size, min=1, help="Images per VQ-encoder call."),
    encoders: Optional[int] = typer.Option(TOKENIZE.encoders, min=1,
                                           help="VQ-encoder actors (default: one per GPU, else CPUs/2)."),
    cpus_per_encoder: float = typer.Option(TOKENIZE.cpus_per_encoder, min=0.1,
                                           help="Ray CPUs (and torch threads) per encoder actor."),
    clip: Optional[Path] = typer.Option(None, help=CLIP_DIR_HELP),
    clip_model: Optional[str] = typer.Option(None, help=CLIP_MODEL_HELP),
    clip_pretrained: Optional[str] = typer.Option(None, help=CLIP_PRETRAINED_HELP),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Turn raw shards into token shards: VQ codes per image, BPE ids per caption (Ray Data, resumable).

    Examples:

      cm3 tokenize data/raw --out data/tokens --tokenizer tokenizer/

      cm3 tokenize data/raw --out data/tokens --tokenizer tokenizer/ --ray-address auto --encoders 8

      cm3 tokenize data/raw --out data/tokens --tokenizer tokenizer/ --clip-model ViT-B-32 --clip-pretrained openai
    """
    from cm3.pipeline.tokenize import check_tokenize_inputs, run_tokenize
    from cm3.workflows.ray_session import connect

    try:
        check_tokenize_inputs(raw, tokenizer, out)
    except InputError as err:
        fail(str(err))
    identity = clip_identity(clip, clip_model, clip_pretrained)
    connect(ray_address)
    try:
        settings = TokenizeSettings(batch_size=batch_size, encoders=encoders, cpus_per_encoder=cpus_per_encoder)
        result = run_tokenize(raw, out, tokenizer, clip=identity, settings=settings, progress=progress)
    except InputError as err:
        fail(str(err))
    echo_tokenize_result(result, out)


def demo_data_serve(
    n: int = typer.Option(2000, min=1, help="Images in the URL list."),
    seed: int = typer.Option(0, help="Seed of the generator."),
    split: str = typer.Option("train", help="train (held-out pairs excluded) or heldout (only those)."),
    port: int = typer.Option(8765, min=0, max=65535, help="Port on 127.0.0.1 (0: any free port)."),
    write_lists: Optional[Path] = typer.Option(None, help="Also write the URL lists (all formats) into this folder."),
) -> None:
    """Serve the demo images and URL lists on 127.0.0.1, with broken cases for tests, until Ctrl-C.

    Examples:

      cm3 demo-data serve --port 8765

      cm3 demo-data serve --n 10000 --write-lists data/lists
    """
    from cm3.synthetic.server import serve_forever

    serve_forever(n=n, seed=seed, split=split, port=port, write_lists_dir=write_lists)


def demo_data_write_urls(
    path: Path = typer.Argument(..., help="Output list; the suffix picks the format (.parquet .csv .tsv .jsonl .txt)."),
    base_url: str = typer.Option("http://127.0.0.1:8765", help="Where `cm3 demo-data serve` listens."),
    n: int = typer.Option(2000, min=1, help="Rows."),
    seed: int = typer.Option(0, help="Seed of the generator."),
    split: str = typer.Option("train", help="train or heldout."),
    broken: bool = typer.Option(False, "--broken", help="Append the broken cases (404, truncated JPEG, ...)."),
) -> None:
    """Write the demo URL list without starting a server.

    Example:

      cm3 demo-data write-urls lists/urls.parquet --n 500 --broken
    """
    from cm3.synthetic.server import write_url_list

    try:
        write_url_list(path, base_url, n, seed=seed, split=split, include_broken=broken)
    except ValueError as err:
        fail(str(err))
    typer.echo(str(path))


def demo(
    workdir: Path = typer.Option(Path("runs/demo"), help="Where every stage writes; a stage whose output exists is skipped."),
    seed: Optional[int] = typer.Option(None, help="Seed of the data draws, every model's initialisation and sampling "
                                       "(default: DemoSize's, 0)."),
    small: bool = typer.Option(False, "--small", help="Reduced size (60 images, a few steps per stage): a smoke test."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the workdir first and start over."),
    stages: str = typer.Option("all", help="all, or ingest (download only)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join; default: start a local one."),
) -> None:
    """Run the whole pipeline on the embedded demo data and write a report with measured quality.

    Serve the demo data over loopback -> ingest on Ray -> train the VQ-GAN (demo preset: 64 tokens
    per image), the BPE and a small CLIP -> tokenize -> build-index -> pretrain -> SFT -> generate
    for seen and held-out (shape, colour) pairs and caption new images -> WORKDIR/report (report.md,
    metrics.json, picture grids).

    Examples:

      cm3 demo --workdir runs/demo

      cm3 demo --workdir runs/demo-seed1 --seed 1

      cm3 demo --workdir /tmp/demo --small --fresh
    """
    from dataclasses import replace

    from cm3.workflows.demo.run import SMALL, DemoSize, run_demo

    if stages not in ("all", "ingest"):
        fail(f"--stages {stages!r}: expected all or ingest")
    try:
        size = SMALL if small else DemoSize()
        run_demo(workdir=workdir, size=size if seed is None else replace(size, seed=seed), fresh=fresh,
                 ray_address=ray_address, stages=stages)
    except InputError as err:
        fail(str(err))
