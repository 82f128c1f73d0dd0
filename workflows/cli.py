"""The ``cm3`` command line. Thin: it parses and validates, then calls the rooms that do the work."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from cm3.pipeline.url_list import FORMATS, InputError

app = typer.Typer(
    name="cm3",
    help="CM3Leon toolkit: ingest image-caption pairs, index them, train the decoder, generate.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
demo_data_app = typer.Typer(help="The embedded demo data set: captioned synthetic shapes.", no_args_is_help=True)
app.add_typer(demo_data_app, name="demo-data")
tokenizer_app = typer.Typer(help="Train and assemble the image (VQ-GAN) and text (BPE) tokenizers.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
clip_app = typer.Typer(help="Train a small OpenCLIP model for offline retrieval.", no_args_is_help=True)
app.add_typer(clip_app, name="clip")
sft_app = typer.Typer(help="Build instruction-tuning (SFT) task shards.", no_args_is_help=True)
app.add_typer(sft_app, name="sft")
model_app = typer.Typer(help="Create and inspect CM3 decoder checkpoints.", no_args_is_help=True)
app.add_typer(model_app, name="model")

EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


CLIP_DIR_HELP = "A CLIP folder written by `cm3 clip train` (adds CLIP vectors)."
CLIP_MODEL_HELP = "An OpenCLIP model name instead, e.g. ViT-B-32 (adds CLIP vectors)."
CLIP_PRETRAINED_HELP = "With --clip-model: an OpenCLIP pretrained tag (needs the hub) or a local checkpoint file."


def clip_identity(clip_dir: Optional[Path], clip_model: Optional[str], clip_pretrained: Optional[str]) -> Optional[dict]:
    """{"model_name", "pretrained"} from either a trained CLIP folder or an OpenCLIP name and tag/file."""
    if clip_dir is not None and clip_model is not None:
        fail("give either --clip or --clip-model, not both")
    if clip_dir is not None:
        import json

        from cm3.index.clip_embedder import TRAINED_CONFIG_FILE

        config_path = clip_dir / TRAINED_CONFIG_FILE
        if not config_path.is_file():
            fail(f"{clip_dir}: not a trained CLIP folder ({TRAINED_CONFIG_FILE} is missing); see cm3 clip train")
        config = json.loads(config_path.read_text())
        return {"model_name": config["model_name"], "pretrained": str((clip_dir / config["checkpoint"]).resolve())}
    if clip_model is not None:
        from cm3.index.clip_embedder import check_model_source

        try:
            check_model_source(clip_model, clip_pretrained)
        except (ValueError, FileNotFoundError) as err:
            fail(str(err))
        return {"model_name": clip_model, "pretrained": clip_pretrained}
    return None


@app.command()
def ingest(
    urls: Path = typer.Argument(..., help="URL list: .parquet, .csv, .tsv, .jsonl or .txt (one URL per line)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for raw shards, their stats and the run summary."),
    input_format: Optional[str] = typer.Option(None, help=f"Input format when the suffix does not say: {', '.join(FORMATS)}."),
    url_col: Optional[str] = typer.Option(None, help="URL column (default: the first of url, URL, image_url)."),
    caption_col: Optional[str] = typer.Option(None, help="Caption column (default: the first of caption, TEXT, text)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join (host:port or 'auto'); default: start a local one."),
    processes: Optional[int] = typer.Option(None, min=1, help="Shards downloaded at once (default: the cluster's CPUs)."),
    threads: int = typer.Option(64, min=1, help="Download threads per shard."),
    cpus_per_task: float = typer.Option(1.0, min=0.01, help="Ray CPUs reserved by each shard task."),
    shard_rows: int = typer.Option(10_000, min=1, help="URLs per shard (bounds shard size and memory)."),
    image_size: int = typer.Option(256, min=8, help="Output side in pixels (center crop)."),
    resize_mode: str = typer.Option("center_crop", help="img2dataset resize mode: center_crop, border, keep_ratio, no."),
    timeout: float = typer.Option(10.0, min=0.1, help="Seconds before a download times out."),
    retries: int = typer.Option(0, min=0, help="Extra tries per URL inside a shard."),
    max_shard_retry: int = typer.Option(1, min=0, help="Times Ray re-runs a shard task that failed."),
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
    from cm3.pipeline.download import DownloadSettings, check_output_folder, run_download
    from cm3.pipeline.summary import format_summary
    from cm3.pipeline.tokenize import check_tokenizer_folder, run_tokenize
    from cm3.pipeline.url_list import open_url_list
    from cm3.workflows.ray_session import connect

    settings = DownloadSettings(
        shard_rows=shard_rows,
        image_size=image_size,
        resize_mode=resize_mode,
        timeout=timeout,
        retries=retries,
        thread_count=threads,
    )
    try:
        spec = open_url_list(urls, input_format, url_col, caption_col)
        check_output_folder(out, spec, settings)
        if tokenizer is not None:
            check_tokenizer_folder(tokenizer)
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
    result = run_download(
        spec, out, settings,
        processes=workers,
        cpus_per_task=cpus_per_task,
        max_shard_retry=max_shard_retry,
        retry_failed=retry_failed,
        progress=progress,
    )
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


SFT_SOURCES = ("captioning", "vqa", "text_to_image", "image_editing", "grounded_generation")


@sft_app.command("convert")
def sft_convert(
    task: str = typer.Option(..., help=f"One of {', '.join(SFT_SOURCES)}."),
    source: Path = typer.Option(..., help="COCO captions JSON, VQA2 questions JSON, InstructPix2Pix JSONL or grounded records."),
    images: Path = typer.Option(..., help="Folder the records' image names (or ids) are resolved in."),
    tokenizer: Path = typer.Option(..., help="Tokenizer folder (cm3 tokenizer build)."),
    out: Path = typer.Option(..., help="Folder for the task shards."),
    annotations: Optional[Path] = typer.Option(None, help="VQA2 annotations JSON (vqa only)."),
    image_pattern: str = typer.Option("{}", help="How an image id or name becomes a file name, e.g. COCO_val2014_{:012d}.jpg."),
    shard_rows: int = typer.Option(10_000, min=1, help="Rows per task shard."),
    seed: int = typer.Option(0, help="Seed of the instruction-template choice."),
) -> None:
    """Convert a public data set's files into SFT task shards (instruction templates, the paper's layouts).

    Examples:

      cm3 sft convert --task captioning --source captions_train2017.json --images coco/train2017 --tokenizer tok/ --out sft/coco

      cm3 sft convert --task vqa --source v2_Questions.json --annotations v2_Annotations.json --images coco/val2014 --image-pattern COCO_val2014_{:012d}.jpg --tokenizer tok/ --out sft/vqa
    """
    from PIL import Image

    from cm3.model import sft_tasks
    from cm3.tokenizers.multimodal import MultimodalTokenizer

    if task not in SFT_SOURCES:
        fail(f"--task {task!r}: expected one of {', '.join(SFT_SOURCES)}")
    if task == "vqa" and annotations is None:
        fail("--task vqa needs --annotations (the VQA2 annotations JSON)")

    def load(ref) -> Image.Image:
        with Image.open(images / image_pattern.format(ref)) as image:
            return image.convert("RGB")

    try:
        multimodal = MultimodalTokenizer.load(tokenizer)
        converters = {
            "captioning": lambda: sft_tasks.captioning_rows(source, multimodal, load, seed),
            "vqa": lambda: sft_tasks.vqa_rows(source, annotations, multimodal, load, seed),
            "text_to_image": lambda: sft_tasks.text_to_image_rows(source, multimodal, load, seed),
            "image_editing": lambda: sft_tasks.editing_rows(source, multimodal, load, seed),
            "grounded_generation": lambda: sft_tasks.grounded_rows(source, multimodal, load, seed),
        }
        written = sft_tasks.write_task_shards(converters[task](), out, multimodal.tokens_per_image, shard_rows)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(f"{out}: {len(written)} task shard(s) written")


@sft_app.command("demo")
def sft_demo(
    tokenizer: Path = typer.Option(..., help="Tokenizer folder (cm3 tokenizer build)."),
    out: Path = typer.Option(..., help="Folder for the task shards."),
    n: int = typer.Option(1000, min=1, help="Demo images; each yields 7 rows (captioning, 3 VQA, text-to-image, edit, grounding)."),
    seed: int = typer.Option(0, help="Generator seed (held-out shape/colour pairs never appear)."),
    shard_rows: int = typer.Option(1000, min=1, help="Rows per task shard."),
) -> None:
    """SFT task shards from the embedded demo data: every task, from the generator's own geometry.

    Example:

      cm3 sft demo --tokenizer runs/demo/tokenizer --out runs/demo/sft --n 500
    """
    from cm3.model.sft_tasks import demo_tasks, write_task_shards
    from cm3.tokenizers.multimodal import MultimodalTokenizer

    try:
        multimodal = MultimodalTokenizer.load(tokenizer)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    written = write_task_shards(demo_tasks(multimodal, n, seed), out, multimodal.tokens_per_image, shard_rows)
    typer.echo(f"{out}: {len(written)} task shard(s) written ({7 * n} rows)")


@tokenizer_app.command("train-vq")
def tokenizer_train_vq(
    data: Path = typer.Option(..., help="Raw shards folder written by cm3 ingest."),
    out: Path = typer.Option(..., help="Folder for checkpoint/, report.json and reconstructions.png."),
    preset: str = typer.Option("f8-8192", help="f8-8192 (1024 tokens, the paper's), f16-1024, or demo (64 tokens)."),
    steps: int = typer.Option(100_000, min=1, help="Optimizer steps (or stop at --seconds)."),
    seconds: Optional[float] = typer.Option(None, help="Wall-clock training budget in seconds."),
    batch_size: int = typer.Option(8, min=1, help="Images per step."),
    lr: float = typer.Option(2e-4, help="Learning rate (Adam, betas 0.5/0.9 as taming)."),
    lpips_weights: Optional[Path] = typer.Option(None, help="Local LPIPS weights file: adds the perceptual loss."),
    resume: bool = typer.Option(True, help="Continue from OUT/checkpoint when it exists."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train the VQ-GAN image tokenizer (reconstruction, codebook and commitment losses, PatchGAN after a delay).

    Examples:

      cm3 tokenizer train-vq --data data/raw --out vq/ --preset f8-8192

      cm3 tokenizer train-vq --data runs/demo/raw --out vq/ --preset demo --seconds 600
    """
    from cm3.tokenizers.vq_training import train_vqgan
    from cm3.tokenizers.vqgan import VQGANConfig

    try:
        config = VQGANConfig.preset(preset)
        if lpips_weights is not None and not lpips_weights.is_file():
            raise ValueError(f"{lpips_weights}: no such LPIPS weights file")
        report = train_vqgan(data, out, config, steps=steps, batch_size=batch_size, lr=lr, seconds_budget=seconds,
                             lpips_weights=lpips_weights, resume=resume, progress=progress)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(f"{out}: held-out PSNR {report['heldout_psnr_db']:.2f} dB, SSIM {report['heldout_ssim']:.3f}, "
               f"codebook usage {report['heldout_codebook_usage']:.2f} after {report['steps']} steps; "
               f"weights in {out / 'checkpoint'}")


@clip_app.command("train")
def clip_train(
    data: Path = typer.Option(..., help="Raw shards folder written by cm3 ingest."),
    out: Path = typer.Option(..., help="Folder for the checkpoint and clip_config.json."),
    model: str = typer.Option("cm3-clip-tiny", help="OpenCLIP model name (this project's small configs included)."),
    steps: int = typer.Option(600, min=1, help="Optimizer steps (or stop at --seconds)."),
    seconds: Optional[float] = typer.Option(None, help="Wall-clock training budget in seconds."),
    batch_size: int = typer.Option(128, min=2, help="Image-text pairs per step."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW, cosine)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train a small OpenCLIP model from scratch on ingested pairs (for machines that cannot download CLIP).

    The checkpoint loads with open_clip.create_model_and_transforms(MODEL, pretrained=FILE), and
    `--clip OUT` passes it to cm3 tokenize / ingest / build-index.

    Example:

      cm3 clip train --data runs/demo/raw --out clip/ --seconds 240
    """
    from cm3.index.clip_training import train_clip

    try:
        report = train_clip(data, out, model_name=model, steps=steps, batch_size=batch_size, lr=lr,
                            seconds_budget=seconds, progress=progress)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(f"{out}: {json_summary(report)}")


def json_summary(report: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items()
                     if isinstance(v, (int, float)))


@tokenizer_app.command("train-text")
def tokenizer_train_text(
    data: Path = typer.Option(..., help="Raw shards folder (cm3 ingest output) or one Parquet file."),
    out: Path = typer.Option(..., help="Where to write tokenizer.json."),
    vocab_size: int = typer.Option(8192, min=300, help="BPE vocabulary size (the paper used 56,320)."),
    caption_col: str = typer.Option("caption", help="Caption column."),
) -> None:
    """Train a byte-level BPE text tokenizer on the shards' captions.

    Example:

      cm3 tokenizer train-text --data data/raw --out tok/tokenizer.json --vocab-size 8192
    """
    from cm3.tokenizers.text import train_from_shards

    try:
        tokenizer = train_from_shards(data, vocab_size, caption_col)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    typer.echo(f"{out}: {tokenizer.vocab_size} tokens")


@tokenizer_app.command("build")
def tokenizer_build(
    text: Path = typer.Option(..., help="A tokenizer.json (from train-text, or any Hugging Face one)."),
    vq: Path = typer.Option(..., help="A VQ-GAN folder (from train-vq, or VQGAN.save_pretrained)."),
    out: Path = typer.Option(..., help="Folder for the joint tokenizer artefact."),
) -> None:
    """Join a text tokenizer and a VQ-GAN into one artefact with one id space (MultimodalTokenizer).

    Example:

      cm3 tokenizer build --text tok/tokenizer.json --vq vq/ --out tokenizer/
    """
    from cm3.tokenizers.multimodal import MultimodalTokenizer
    from cm3.tokenizers.text import TextTokenizer
    from cm3.tokenizers.vqgan import VQGAN

    for path in (text, vq):
        if not path.exists():
            fail(f"{path}: no such file or folder")
    tokenizer = MultimodalTokenizer(TextTokenizer.from_file(text), VQGAN.from_pretrained(vq))
    tokenizer.save(out)
    vocab = tokenizer.vocab
    typer.echo(f"{out}: {vocab.size} ids (text {vocab.text_vocab_size} from {vocab.text_offset}, "
               f"image {vocab.image_vocab_size} from {vocab.image_offset}), {tokenizer.tokens_per_image} tokens/image")


@app.command()
def tokenize(
    raw: Path = typer.Argument(..., help="Raw shards folder written by cm3 ingest."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for token shards."),
    tokenizer: Path = typer.Option(..., help="Tokenizer folder (cm3 tokenizer build)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join; default: start a local one."),
    batch_size: int = typer.Option(32, min=1, help="Images per VQ-encoder call."),
    encoders: Optional[int] = typer.Option(None, min=1, help="VQ-encoder actors (default: one per GPU, else CPUs/2)."),
    cpus_per_encoder: float = typer.Option(1.0, min=0.1, help="Ray CPUs (and torch threads) per encoder actor."),
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
        check_tokenize_inputs(raw, tokenizer)
    except InputError as err:
        fail(str(err))
    identity = clip_identity(clip, clip_model, clip_pretrained)
    connect(ray_address)
    try:
        result = run_tokenize(raw, out, tokenizer, clip=identity, batch_size=batch_size, encoders=encoders,
                              cpus_per_encoder=cpus_per_encoder, progress=progress)
    except InputError as err:
        fail(str(err))
    echo_tokenize_result(result, out)


def _parse_bytes(text: str) -> int:
    """'512MB', '4GB', '4GiB', '1e9' -> bytes (binary units)."""
    import re

    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not match:
        fail(f"--memory-budget {text!r}: expected a size such as 512MB or 4GB")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " "))


@app.command("build-index")
def build_index_command(
    tokens: Path = typer.Argument(..., help="Token shards folder (cm3 tokenize / cm3 ingest --tokenizer)."),
    index: Path = typer.Option(..., "--index", help="Folder for the FAISS index and the document store."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the retrieval-augmented shards."),
    k: int = typer.Option(2, min=0, help="Neighbours per document (the paper's default is 2)."),
    max_similarity: float = typer.Option(0.9, help="Skip candidates more similar than this to the query or a chosen one."),
    query_dropout: float = typer.Option(0.0, help="Drop this share of the query's words before embedding (0.2 in training)."),
    memory_budget: str = typer.Option("4GB", help="Memory the index may use; picks Flat/HNSW/IVF/IVF-PQ."),
    recall_target: float = typer.Option(0.95, help="Recall@10 against exact search the tuning must reach."),
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
        retrieval = RetrievalSettings(k=k, max_similarity=max_similarity, candidates=max(32, 8 * k + 1),
                                      query_dropout=query_dropout)
        check_build_inputs(tokens, identity)
    except (InputError, ValueError) as err:
        fail(str(err))
    settings = IndexSettings(memory_budget_bytes=_parse_bytes(memory_budget), recall_target=recall_target,
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


@app.command()
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

    from cm3.index.build import load_for_search
    from cm3.index.clip_embedder import ClipEmbedder
    from cm3.pipeline import raw_shards
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
            table = pq.read_table(raw_shards.parquet_path(raw_dir, shard), columns=["key", "jpg"],
                                  filters=[("key", "=", key)])
            pictures.append(Image.open(io.BytesIO(table.column("jpg")[0].as_py())))
            captions.append(f"{score:.2f} {documents.column('caption')[row].as_py()}")
        image_grid(pictures, captions, cols=min(4, len(pictures))).save(sheet)
        typer.echo(f"contact sheet: {sheet}")


@model_app.command("init")
def model_init(
    tokenizer: Path = typer.Option(..., help="Tokenizer folder (cm3 tokenizer build): fixes the vocabulary size."),
    out: Path = typer.Option(..., help="Checkpoint folder to write."),
    preset: str = typer.Option("tiny", help="tiny, 350m, 760m or 7b (the paper's sizes)."),
    seq_len: Optional[int] = typer.Option(None, min=8, help="Context length (default: the preset's)."),
    seed: int = typer.Option(0, help="Initialisation seed."),
) -> None:
    """Write a freshly initialised decoder (the paper's init) with its tokenizer as a checkpoint.

    Example:

      cm3 model init --tokenizer tokenizer/ --preset tiny --out ckpt/init
    """
    import torch

    from cm3.model.checkpoint import save_checkpoint
    from cm3.model.config import CM3Config, num_parameters
    from cm3.model.decoder import CM3
    from cm3.tokenizers.multimodal import MultimodalTokenizer

    try:
        multimodal = MultimodalTokenizer.load(tokenizer)
        overrides = {"max_seq_len": seq_len} if seq_len else {}
        config = CM3Config.from_preset(preset, vocab_size=multimodal.vocab.size, **overrides)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    torch.manual_seed(seed)
    save_checkpoint(out, CM3(config), multimodal, {"stage": "init", "preset": preset, "seed": seed})
    typer.echo(f"{out}: {preset} decoder, {num_parameters(config) / 1e6:.1f}M parameters, vocab {config.vocab_size}")


def _sampling(method: str, guidance: float, temperature: float, top_p: float, cd_alpha: float, cd_k: int, seed: int):
    from cm3.model.generation import SamplingConfig

    try:
        return SamplingConfig(temperature=temperature, top_p=top_p, guidance_scale=guidance, method=method,
                              cd_alpha=cd_alpha, cd_k=cd_k, seed=seed)
    except ValueError as err:
        fail(str(err))


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What the image should show."),
    checkpoint: Path = typer.Option(..., help="Checkpoint folder (decoder + tokenizer)."),
    n: int = typer.Option(4, "-n", min=1, help="Images to sample."),
    out: Path = typer.Option(Path("generated.png"), help="PNG grid to write (the images also go beside it)."),
    method: str = typer.Option("top_p", help="top_p, cd_k, greedy, or mix (half top-p, half CD-K as in the paper)."),
    guidance: float = typer.Option(3.0, help="Classifier-free guidance scale (1: none)."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    top_p: float = typer.Option(0.9, help="Nucleus mass."),
    cd_alpha: float = typer.Option(0.1, help="CD-K plausibility cut-off alpha."),
    cd_k: int = typer.Option(5, help="CD-K: compare with the k-th largest expert probability."),
    seed: int = typer.Option(0, help="Sampling seed."),
    index: Optional[Path] = typer.Option(None, help="Retrieve documents for the prompt from this index and prepend them."),
    retrieved: int = typer.Option(2, min=0, help="With --index: how many documents to prepend."),
    rerank: bool = typer.Option(False, "--rerank", help="Order the N images by CLIP score (the index's CLIP model)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Text to image: sample N images for a prompt with CFG and top-p or CD-K, save a PNG grid.

    Examples:

      cm3 generate "a small red circle at the top left on a white background" --checkpoint ckpt/sft -n 8

      cm3 generate "a blue square" --checkpoint ckpt/sft --method mix --guidance 4 --out blue.png

      cm3 generate "a green circle" --checkpoint ckpt/sft --index data/index -n 8 --rerank
    """
    from cm3.model.checkpoint import load_checkpoint
    from cm3.model.generation import rerank_by_clip, text_to_image
    from cm3.workflows.report import image_grid, to_pil

    sampling = _sampling("top_p" if method == "mix" else method, guidance, temperature, top_p, cd_alpha, cd_k, seed)
    if rerank and index is None:
        fail("--rerank scores with the CLIP model of an index: give --index too")
    try:
        model, tokenizer = load_checkpoint(checkpoint, device=device)
        retriever = None
        if index is not None:
            from cm3.index.query import Retriever

            retriever = Retriever(index)
        docs = retriever.for_text(prompt, retrieved) if retriever is not None and retrieved else None
        images, _ = text_to_image(model, tokenizer, prompt, n, sampling, retrieved=docs, mix=method == "mix")
    except (FileNotFoundError, ValueError, InputError) as err:
        fail(str(err))
    pictures = [to_pil(image) for image in images]
    if rerank:
        embedder = retriever.embedder
        order = rerank_by_clip(images, prompt, lambda _, text: embedder.embed_images(pictures)
                               @ embedder.embed_texts([text])[0])
        pictures = [pictures[i] for i in order.tolist()]
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(pictures, [f"{prompt} #{i}" for i in range(n)], cols=min(4, n)).save(out)
    for i, picture in enumerate(pictures):
        picture.save(out.with_name(f"{out.stem}_{i}.png"))
    typer.echo(f"{out}: {n} images for {prompt!r}")


@app.command()
def caption(
    images: list[Path] = typer.Argument(..., help="Image files (any size; center-cropped to the tokenizer's)."),
    checkpoint: Path = typer.Option(..., help="Checkpoint folder (decoder + tokenizer)."),
    question: Optional[str] = typer.Option(None, help="Ask a question instead (VQA layout)."),
    method: str = typer.Option("greedy", help="greedy or top_p."),
    max_new_tokens: int = typer.Option(32, min=1, help="Longest answer."),
    seed: int = typer.Option(0, help="Sampling seed (top_p)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Image to text: caption images, or answer a question about them.

    Examples:

      cm3 caption photo.jpg --checkpoint ckpt/sft

      cm3 caption shape.png --checkpoint ckpt/sft --question "what colour is the shape?"
    """
    import torch

    from cm3.model.checkpoint import load_checkpoint
    from cm3.model.generation import caption_image
    from cm3.workflows.report import load_image_tensor

    for path in images:
        if not path.is_file():
            fail(f"{path}: no such image file")
    sampling = _sampling(method, 1.0, 1.0, 0.9, 0.1, 5, seed)
    try:
        model, tokenizer = load_checkpoint(checkpoint, device=device)
        size = tokenizer.vq.config.resolution
        batch = torch.cat([load_image_tensor(path, size) for path in images]).to(device)
        answers = caption_image(model, tokenizer, batch, question=question, sampling=sampling,
                                max_new_tokens=max_new_tokens)
    except (FileNotFoundError, ValueError, OSError) as err:
        fail(str(err))
    for path, answer in zip(images, answers):
        typer.echo(f"{path}\t{answer}")


@demo_data_app.command("serve")
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
    from cm3.workflows.demo.server import serve_forever

    serve_forever(n=n, seed=seed, split=split, port=port, write_lists_dir=write_lists)


@demo_data_app.command("write-urls")
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
    from cm3.workflows.demo.server import write_url_list

    try:
        write_url_list(path, base_url, n, seed=seed, split=split, include_broken=broken)
    except ValueError as err:
        fail(str(err))
    typer.echo(str(path))


@app.command()
def demo(
    workdir: Path = typer.Option(Path("runs/demo"), help="Where every stage writes; a stage whose output exists is skipped."),
    small: bool = typer.Option(False, "--small", help="Reduced size (60 images, seconds-long budgets): a smoke test."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the workdir first and start over."),
    stages: str = typer.Option("all", help="all, or ingest (download only)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join; default: start a local one."),
) -> None:
    """Run the whole pipeline on the embedded demo data and write a report with measured quality.

    Serve the demo data over loopback -> ingest on Ray -> train the VQ-GAN (demo preset: 64 tokens
    per image), the BPE and a small CLIP -> tokenize -> build-index -> pretrain -> SFT -> generate
    for held-out prompts and caption held-out images -> WORKDIR/report (report.md, metrics.json, grids).

    Examples:

      cm3 demo --workdir runs/demo

      cm3 demo --workdir /tmp/demo --small --fresh
    """
    from cm3.workflows.demo.run import SMALL, DemoSize, run_demo

    if stages not in ("all", "ingest"):
        fail(f"--stages {stages!r}: expected all or ingest")
    run_demo(workdir=workdir, size=SMALL if small else DemoSize(), fresh=fresh, ray_address=ray_address,
             stages=stages)


from cm3.workflows.train import train_command  # noqa: E402  (stdlib + typer only at import)

app.command("train")(train_command)


def main() -> None:
    """Console-script entry point (`cm3`)."""
    app(prog_name="cm3")


if __name__ == "__main__":
    sys.exit(main())
