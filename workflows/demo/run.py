"""`cm3 demo`: the whole CM3Leon pipeline on the embedded data, stage by stage, in one work folder.

    serve demo data -> ingest (Ray) -> VQ-GAN, BPE, small CLIP -> tokenize -> build-index
    -> pretrain (retrieval-augmented, CM3 objective) -> SFT -> generate + caption -> report

Each stage writes ``WORKDIR/<stage>`` and marks success with a ``.done`` file, so a re-run skips
finished stages and resumes the rest (every stage is itself resumable); ``--fresh`` starts over.
The demo's image tokenizer is the ``demo`` preset of the VQ-GAN (8x8 = 64 tokens per 256x256
image, not the paper's 1024) so that every stage fits on 2 CPU cores.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.parquet as pq
import torch
from PIL import Image

from cm3.pipeline import raw_shards
from cm3.pipeline.download import DownloadSettings, run_download
from cm3.pipeline.summary import format_summary
from cm3.pipeline.url_list import open_url_list
from cm3.workflows.demo.checker import read_attributes
from cm3.workflows.demo.server import DemoDataServer, write_url_list
from cm3.workflows.ray_session import connect
from cm3.workflows.report import image_grid, to_pil

DONE = ".done"
DEMO_SHARD_ROWS = 250
GRID_IMAGES = 24  # images per report picture
SFT_IMAGES_SEED = 1  # the instruction-tuning images' seed (the pretraining images are seed 0's)
NEW_IMAGES_SEED = 2  # images no stage trains on


@dataclass(frozen=True)
class DemoSize:
    """Budgets of one demo run; ``SMALL`` is the reduced size the tests run end to end."""

    images: int = 2000
    vq_seconds: float = 420.0  # the VQ-GAN and the CLIP train side by side, one core each
    clip_seconds: float = 420.0
    vocab_size: int = 512
    seq_len: int = 320
    lm_width: int = 128  # d_model of the decoder (the "tiny" preset's 4 layers): 2.5x the steps of width 256
    # RoPE, not the paper's learned absolute positions: an image token's neighbours sit at fixed offsets (1 left, 8
    # up) wherever its image starts, which rotary attention sees from the first step; 1,000 steps of learned
    # positions left the image loss at ~1.8 and drew mixed backgrounds, RoPE ~1.05 (README: "`cm3 demo`").
    lm_positions: str = "rope"
    # DALL-E's row and column embeddings on image tokens (the demo preset's 8x8 grid): the decoder knows which
    # cell it is drawing without counting from the image's start (image loss -0.05 nats at 1,000 steps)
    lm_image_grid: int = 8
    # share of pretraining documents in captioning order; the rest teach text -> image. At 1,000 steps 0.2
    # instead of the default 0.5 made the decoder read colour and position words more (README: "`cm3 demo`")
    pretrain_image_first: float = 0.2
    pretrain_steps: int = 1000
    pretrain_lr: float = 3e-3
    sft_images: int = 300
    sft_steps: int = 250
    sft_lr: float = 1e-3
    train_threads: int = 2  # the training worker holds 1 CPU (Ray Data reads beside it) but uses both cores
    temperature: float = 0.7  # sampling temperature of every generation (with top-p 0.9 / CD-K and CFG)
    prompts: int = 24  # held-out prompts (attribute pairs never seen together in training): 48 samples per figure
    samples: int = 2  # images per prompt
    nll_images: int = 96  # images per figure of the decoder's image loss given the caption


SMALL = DemoSize(images=60, vq_seconds=8, clip_seconds=8, vocab_size=300, pretrain_steps=4, sft_images=8,
                 sft_steps=3, prompts=3, samples=1, nll_images=4)


def _done(folder: Path) -> bool:
    return (folder / DONE).exists()


def _mark_done(folder: Path, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    raw_shards.write_json_atomic(folder / DONE, {"finished": time.time(), **info})


def _info(folder: Path) -> dict:
    return raw_shards.read_json(folder / DONE)


def _port_of(url_list: Path) -> int:
    first_url = pq.read_table(url_list, columns=["url"]).column("url")[0].as_py()
    return urlparse(first_url).port or 0


def ingest_stage(workdir: Path, size: DemoSize) -> Path:
    raw = workdir / "raw"
    if _done(raw):
        print(f"[ingest] done already: {raw}", flush=True)
        return raw
    url_list = workdir / "urls.parquet"
    # serve on the port the existing URL list names, so a resumed ingest sees the same list
    port = _port_of(url_list) if url_list.exists() else 0
    try:
        server = DemoDataServer(n=size.images, seed=0, split="train", port=port).start()
    except OSError:  # that port is taken now: start the stage over on a free one
        url_list.unlink(missing_ok=True)
        server = DemoDataServer(n=size.images, seed=0, split="train", port=0).start()
    try:
        if not url_list.exists():
            shutil.rmtree(raw, ignore_errors=True)
            write_url_list(url_list, server.url, size.images, seed=0, split="train")
        print(f"[ingest] demo data served at {server.url}; URL list {url_list}", flush=True)
        result = run_download(open_url_list(url_list), raw, DownloadSettings(shard_rows=DEMO_SHARD_ROWS),
                              processes=2, cpus_per_task=0.5)
    finally:
        server.stop()
    print(format_summary(result.summary), flush=True)
    if result.shards_failed:
        raise RuntimeError(f"[ingest] {len(result.shards_failed)} shard(s) failed; run `cm3 demo` again to resume")
    _mark_done(raw, {"summary": result.summary})
    return raw


def tokenizer_stage(workdir: Path, raw: Path, size: DemoSize) -> Path:
    """VQ-GAN (demo preset), BPE, and both joined into one tokenizer artefact."""
    from cm3.tokenizers.multimodal import MultimodalTokenizer
    from cm3.tokenizers.text import train_from_shards
    from cm3.tokenizers.vq_training import demo_training_options, train_vqgan
    from cm3.tokenizers.vqgan import VQGAN, VQGANConfig

    folder = workdir / "tokenizer"
    if _done(folder):
        print(f"[tokenizer] done already: {folder}", flush=True)
        return folder
    print(f"[tokenizer] training the VQ-GAN (demo preset, {size.vq_seconds:.0f} s budget)", flush=True)
    report = train_vqgan(raw, workdir / "vq", VQGANConfig.preset("demo"), seconds_budget=size.vq_seconds,
                         batch_size=4, lr=2e-4, options=demo_training_options())  # one thread: CLIP has the other
    print(f"[tokenizer] VQ-GAN held-out PSNR {report['heldout_psnr_db']:.2f} dB after {report['steps']} steps",
          flush=True)
    text = train_from_shards(raw, size.vocab_size)
    MultimodalTokenizer(text, VQGAN.from_pretrained(workdir / "vq" / "checkpoint")).save(folder)
    _mark_done(folder, {"vq": {k: report[k] for k in ("heldout_psnr_db", "heldout_ssim", "heldout_codebook_usage",
                                                       "steps", "seconds")}})
    return folder


def start_clip_stage(workdir: Path, raw: Path, size: DemoSize):
    """Start training the demo CLIP as a one-CPU Ray task (it runs beside the VQ-GAN); None if done."""
    import ray

    from cm3.index.clip_training import train_clip

    folder = workdir / "clip"
    if _done(folder):
        return None
    print(f"[clip] training the demo CLIP on Ray ({size.clip_seconds:.0f} s budget, beside the VQ-GAN)", flush=True)
    task = ray.remote(num_cpus=1, max_retries=0)(train_clip)
    return task.remote(raw.resolve(), folder.resolve(), seconds_budget=size.clip_seconds, steps=100_000,
                       torch_threads=1, progress=False)


def finish_clip_stage(workdir: Path, pending) -> dict:
    """Wait for the CLIP task started by ``start_clip_stage``; the identity that tokenize embeds with."""
    import ray

    from cm3.index.clip_embedder import TRAINED_CONFIG_FILE

    folder = workdir / "clip"
    if pending is not None:
        report = ray.get(pending)
        print(f"[clip] held-out text->image R@1 {report['heldout']['text_to_image_r@1']:.2f} "
              f"after {report['steps']} steps", flush=True)
        _mark_done(folder, {"report": {k: v for k, v in report.items() if isinstance(v, (int, float))}})
    config = json.loads((folder / TRAINED_CONFIG_FILE).read_text())
    return {"model_name": config["model_name"], "pretrained": str((folder / config["checkpoint"]).resolve())}


def tokenize_stage(workdir: Path, raw: Path, tokenizer: Path, clip: dict) -> Path:
    from cm3.pipeline.tokenize import run_tokenize

    tokens = workdir / "tokens"
    if not _done(tokens):
        result = run_tokenize(raw, tokens, tokenizer, clip=clip, cpus_per_encoder=1.0)
        print(f"[tokenize] {result.rows_tokenized} images in {result.seconds:.1f} s", flush=True)
        _mark_done(tokens, {"images": result.rows_tokenized, "seconds": result.seconds})
    return tokens


def index_stage(workdir: Path, tokens: Path) -> tuple[Path, Path]:
    from cm3.index.build import run_build_index

    index, augmented = workdir / "index", workdir / "augmented"
    if not _done(augmented):
        report = run_build_index(tokens, index, augmented)
        print(f"[build-index] {report['documents']} documents, {report['index']['kind']}", flush=True)
        _mark_done(augmented, {"report": report})
    return index, augmented


def train_stage(workdir: Path, stage: str, shards: Path, size: DemoSize, tokenizer: Path | None,
                init: Path | None) -> Path:
    from cm3.workflows.train import TrainOptions, run_training

    out = workdir / f"ckpt-{stage}"
    if _done(out):
        return out
    steps = size.pretrain_steps if stage == "pretrain" else size.sft_steps
    options = TrainOptions(
        stage=stage, shards=shards, storage=workdir / "train", tokenizer=tokenizer, init=init, out=out,
        preset="tiny", model_overrides={} if init else {"max_seq_len": size.seq_len, "d_model": size.lm_width,
                                                                 "positions": size.lm_positions,
                                                                 "image_grid": size.lm_image_grid},
        seq_len=size.seq_len, batch_size=8, batch_tokens=8 * size.seq_len, steps=steps,
        lr=size.pretrain_lr if stage == "pretrain" else size.sft_lr, warmup_steps=max(1, steps // 20),
        retrieved_min=0, retrieved_max=2, image_first=size.pretrain_image_first,  # SFT rows are laid out already
        checkpoint_every=max(10, steps // 5), log_every=max(1, steps // 20),
        cpus_per_worker=1.0, threads_per_worker=size.train_threads,
    )
    print(f"[train] {stage}: {steps} steps", flush=True)
    result = run_training(options)
    _mark_done(out, {"steps": result.steps, "final_loss": result.final_loss, "loss_curve": str(result.loss_curve)})
    return out


def sft_data_stage(workdir: Path, tokenizer_dir: Path, size: DemoSize) -> Path:
    from cm3.model.sft_tasks import demo_tasks, write_task_shards
    from cm3.tokenizers.multimodal import MultimodalTokenizer

    folder = workdir / "sft-data"
    if not _done(folder):
        tokenizer = MultimodalTokenizer.load(tokenizer_dir)
        tasks = demo_tasks(tokenizer, size.sft_images, seed=SFT_IMAGES_SEED)
        write_task_shards(tasks, folder, tokenizer.tokens_per_image, 500)
        _mark_done(folder, {"images": size.sft_images})
    return folder


def evaluate_stage(workdir: Path, checkpoint: Path, index: Path, augmented: Path, tokens: Path,
                   size: DemoSize, pretrained: Path | None = None) -> dict:
    """Held-out generations and captions, the ablations, and the pictures of the report (``checkpoint``: the
    instruction-tuned decoder; ``pretrained``, when given, also gets the image-loss figures)."""
    from cm3.index.query import Retriever
    from cm3.model.checkpoint import load_checkpoint
    from cm3.model.generation import caption_image, text_to_image
    from cm3.model.sampling import SamplingConfig
    from cm3.model.sft_tasks import TEMPLATES
    from cm3.workflows.demo import evaluate
    from cm3.workflows.demo.shapes import spec_for

    report = workdir / "report"
    report.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_checkpoint(checkpoint)
    retriever = Retriever(index)
    specs = [spec_for(i, seed=0, split="heldout") for i in range(size.prompts)]

    def generate(retrieved_k: int, guidance: float, method: str) -> tuple[torch.Tensor, list]:
        images, asked = [], []
        for i, spec in enumerate(specs):
            docs = retriever.for_text(spec.caption, retrieved_k) if retrieved_k else None
            sampling = SamplingConfig(guidance_scale=guidance, method=method, seed=i, temperature=size.temperature)
            batch, _ = text_to_image(model, tokenizer, spec.caption, size.samples, sampling, retrieved=docs)
            images.append(batch)
            asked += [spec] * size.samples
        return torch.cat(images), asked

    variants = {"retrieval K=2, CFG 3, top-p": (2, 3.0, "top_p"), "no retrieval (K=0)": (0, 3.0, "top_p"),
                "no CFG (scale 1)": (2, 1.0, "top_p"), "CD-K instead of top-p": (2, 3.0, "cd_k")}
    ablations = {}
    for name, (k, guidance, method) in variants.items():
        images, asked = generate(k, guidance, method)
        ablations[name] = evaluate.image_accuracy(images, asked)
        if name.startswith("retrieval K=2"):
            main = ablations[name]
            # every sample counts in the figures; the picture shows the first prompts' samples
            image_grid([to_pil(x) for x in images[:GRID_IMAGES]], [s.caption for s in asked[:GRID_IMAGES]],
                       cols=4).save(report / "generations.png")

    # Held-out images: the prompts' own first, then more for the checker's reading of VQ reconstructions below.
    many = specs + [spec_for(i, seed=0, split="heldout") for i in range(len(specs), 48)]
    many_images = evaluate.spec_images(many, tokenizer.vq.config.resolution)
    held_out_images = many_images[: len(specs)]
    captions = caption_image(model, tokenizer, held_out_images, question=TEMPLATES["captioning"][0])
    image_grid([to_pil(x) for x in held_out_images[:GRID_IMAGES]], captions[:GRID_IMAGES], cols=4).save(
        report / "captions.png")
    captioning = evaluate.caption_accuracy(captions, specs)

    # The checker's reading of the tokenizer's own reconstructions of held-out images: what a decoder that
    # reproduced the true codes would score. It tells the VQ-GAN's share of a text->image error from the LM's.
    reconstructions = tokenizer.decode_image(tokenizer.encode_image(many_images))
    vq_reading = evaluate.image_accuracy(reconstructions, many)
    shown = min(4, len(specs))
    image_grid([to_pil(x) for x in torch.cat([held_out_images[:shown], reconstructions[:shown]])],
               ["original"] * shown + ["VQ reconstruction"] * shown, cols=4).save(
        report / "vq_reconstructions.png")
    _retrieval_examples(augmented, tokenizer, report / "retrieval_examples.png")

    # Pretraining images, new images of training pairs, held-out pairs: memorisation vs generalisation, per token,
    # for both checkpoints.
    n = size.nll_images
    nll_specs = {"training_images": [spec_for(i, seed=0, split="train") for i in range(min(n, size.images))],
                 "training_pairs_new_images": [spec_for(i, seed=NEW_IMAGES_SEED, split="train") for i in range(n)],
                 "held_out_pairs": [spec_for(i, seed=NEW_IMAGES_SEED, split="heldout") for i in range(n)]}
    codes = {name: evaluate.spec_codes(tokenizer, group) for name, group in nll_specs.items()}
    documents = {name: evaluate.caption_first_documents(tokenizer, [spec.alt_text for spec in nll_specs[name]],
                                                        codes[name]) for name in nll_specs}
    decoders = {"pretrained": load_checkpoint(pretrained)[0]} if pretrained else {}
    decoders["tuned"] = model
    image_nll = {stage: {name: round(evaluate.image_nll(decoder, tokenizer.vocab, docs), 4)
                         for name, docs in documents.items()}
                 for stage, decoder in decoders.items()}
    # which words of the full caption each decoder reads: the loss rise when one names the wrong value
    swaps = evaluate.reliance_documents(tokenizer, nll_specs["training_pairs_new_images"],
                                        codes["training_pairs_new_images"])
    reliance = {stage: {name: round(value, 4) for name, value in evaluate.caption_reliance(
                    decoder, tokenizer.vocab, swaps).items()}
                for stage, decoder in decoders.items()}
    return {
        "text_to_image": {**main, "checker_on_vq_reconstructions": {k: vq_reading[k] for k in (
                              "colour_accuracy", "shape_accuracy", "shape_accuracy_by_size")},
                          "image_nll_given_caption": image_nll,
                          "caption_reliance": reliance,
                          "command": f"cm3 generate PROMPT --checkpoint {checkpoint} -n {size.samples} "
                                     f"--temperature {size.temperature}"},
        "image_to_text": {**captioning, "command": f"cm3 caption IMAGE --checkpoint {checkpoint}"},
        "retrieval": {**evaluate.retrieval_agreement(augmented, tokens),
                      "command": f"cm3 build-index {tokens} --index {index} --out {augmented}"},
        "ablations": ablations,
    }


def _retrieval_examples(augmented: Path, tokenizer, path: Path, rows: int = 4) -> None:
    """Each query image followed by its retrieved neighbours, decoded from their VQ codes."""
    table = pq.read_table(raw_shards.parquet_path(augmented, raw_shards.complete_shards(augmented)[0])).slice(0, rows)
    images, captions = [], []
    for row in table.to_pylist():
        codes = [row["image_ids"], *row["neighbour_image_ids"]][:3]
        ids = torch.tensor([[tokenizer.vocab.image_offset + c for c in code] for code in codes])
        decoded = tokenizer.decode_image(ids)
        names = [row["caption"], *[f"neighbour {s:.2f}" for s in row["neighbour_scores"]]]
        for j in range(3):
            images.append(to_pil(decoded[j]) if j < len(decoded) else Image.new("RGB", (64, 64), "white"))
            captions.append(names[j] if j < len(names) else "")
    image_grid(images, captions, cols=3).save(path)


def ingest_metrics(raw: Path) -> dict:
    """How much of the demo data arrived, and whether the pixel checker agrees with each caption."""
    agree_colour = agree_shape = checked = 0
    for shard_id in raw_shards.complete_shards(raw):
        table = pq.read_table(raw_shards.parquet_path(raw, shard_id), columns=["jpg", "caption", "status"])
        for jpg, caption, status in zip(*(table.column(c).to_pylist() for c in ("jpg", "caption", "status"))):
            if status == "success":
                reading = read_attributes(Image.open(io.BytesIO(jpg)).convert("RGB"))
                checked += 1
                agree_colour += f" {reading.colour} " in f" {caption} "
                agree_shape += f" {reading.shape}" in caption
    summary = raw_shards.read_json(raw / raw_shards.SUMMARY_FILE)
    return {"urls": summary["count"], "success_rate": summary["success_rate"],
            "images_per_second": summary.get("this_run", {}).get("images_per_second"),
            "checker_colour_agreement": round(agree_colour / max(checked, 1), 4),
            "checker_shape_agreement": round(agree_shape / max(checked, 1), 4)}


def write_report(workdir: Path, metrics: dict) -> Path:
    report = workdir / "report"
    report.mkdir(parents=True, exist_ok=True)
    for name, source in (("loss_pretrain.png", workdir / "train" / "cm3-pretrain" / "loss_curve.png"),
                         ("loss_sft.png", workdir / "train" / "cm3-sft" / "loss_curve.png"),
                         ("vq_training_reconstructions.png", workdir / "vq" / "reconstructions.png")):
        if source.exists():
            shutil.copy(source, report / name)
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2))
    lines = ["# cm3 demo report", "", f"Work folder: `{workdir}`. Every figure below is in `metrics.json`.", ""]
    for section, values in metrics.items():
        lines.append(f"## {section}")
        lines.append("")
        for key, value in values.items():
            lines.append(f"- {key}: `{json.dumps(value)}`")
        lines.append("")
    pictures = sorted(p.name for p in report.glob("*.png"))
    lines += ["## Pictures", ""] + [f"![{name}]({name})" for name in pictures]
    (report / "report.md").write_text("\n".join(lines) + "\n")
    print(f"[report] {report / 'report.md'}", flush=True)
    return report


def run_demo(workdir: Path, size: DemoSize = DemoSize(), fresh: bool = False, ray_address: str | None = None,
             stages: str = "all") -> dict:
    """Run the stages in order (``stages="ingest"``: only the download, for a quick look)."""
    workdir = Path(workdir)
    if fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    connect(ray_address)
    raw = ingest_stage(workdir, size)
    metrics: dict = {"ingest": {**ingest_metrics(raw), "command": f"cm3 ingest {workdir / 'urls.parquet'} --out {raw}"}}
    if stages != "ingest":
        pending_clip = start_clip_stage(workdir, raw, size)
        tokenizer = tokenizer_stage(workdir, raw, size)
        metrics["tokenizer"] = {**_info(tokenizer)["vq"], "preset": "demo (8x8 = 64 tokens per image)",
                                "command": f"cm3 tokenizer train-vq --data {raw} --out {workdir / 'vq'} --preset demo"
                                           f" --seconds {size.vq_seconds:.0f} --batch-size 4 --threads 1"}
        clip = finish_clip_stage(workdir, pending_clip)
        tokens = tokenize_stage(workdir, raw, tokenizer, clip)
        index, augmented = index_stage(workdir, tokens)
        pretrain = train_stage(workdir, "pretrain", augmented, size, tokenizer, None)
        sft = train_stage(workdir, "sft", sft_data_stage(workdir, tokenizer, size), size, None, pretrain)
        decoder = json.loads((pretrain / "config.json").read_text())
        metrics["training"] = {"decoder": {k: decoder[k] for k in ("n_layers", "d_model", "n_heads", "positions",
                                                                        "image_grid")},
                               "pretrain": _info(pretrain), "sft": _info(sft)}
        metrics.update(evaluate_stage(workdir, sft, index, augmented, tokens, size, pretrained=pretrain))
    metrics["run"] = {"seconds": round(time.time() - started, 1), "size": asdict(size)}
    write_report(workdir, metrics)
    return metrics
