"""`cm3 demo`: the whole CM3Leon pipeline on the embedded data, stage by stage, in one work folder.

    serve demo data -> ingest (Ray) -> VQ-GAN, BPE, small CLIP -> tokenize -> build-index
    -> pretrain (retrieval-augmented, CM3 objective) -> SFT -> generate + caption -> report

Each stage writes ``WORKDIR/<stage>`` and marks success with a ``.done`` file, so a re-run skips
finished stages and resumes the rest (every stage is itself resumable); ``--fresh`` starts over.
The demo's image tokenizer is the ``demo`` preset of the VQ-GAN (8x8 = 64 tokens per 256x256
image, not the paper's 1024) so that every stage fits on 2 CPU cores; the data set's shapes sit on
that grid (``cm3.workflows.demo.shapes``). Budgets are steps, not seconds, so that a seed gives the
same run on any machine.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.parquet as pq
import torch
from cm3.core.errors import InputError
from cm3.core.files import read_json, write_json
from cm3.core.images import decode, to_pil
from cm3.core.shards import complete_shards, parquet_path
from cm3.pipeline.download import SUMMARY_FILE, DownloadSettings, run_download
from cm3.pipeline.summary import format_summary
from cm3.pipeline.url_list import open_url_list
from cm3.synthetic.checker import read_attributes
from cm3.synthetic.server import DemoDataServer, write_url_list
from cm3.tokenizers.training_options import ClipTrainOptions, demo_training_options
from cm3.workflows.ray_session import connect
from cm3.workflows.report import image_grid
from PIL import Image

DONE = ".done"
RUN_CONFIG = "demo_config.json"  # the DemoSize a work folder was made with; another size is refused
DEMO_SHARD_ROWS = 250
GRID_PROMPTS = 8  # prompts per half of the report's picture (seen pairs left, held-out pairs right)
DATA_PURPOSES = {"train": 0, "sft": 1, "new": 2}  # the images of each purpose come from their own seed


@dataclass(frozen=True)
class DemoSize:
    """Budgets and settings of one demo run; ``SMALL`` is the reduced size the tests run end to end."""

    seed: int = 0  # data draws, every model's initialisation and sampling
    images: int = 2000
    vq_steps: int = 1600  # the VQ-GAN and the CLIP train side by side, one core each
    clip_steps: int = 500
    vocab_size: int = 512
    seq_len: int = 320
    lm_width: int = 128  # d_model of the decoder (the "tiny" preset's 4 layers): narrow, so more steps fit the budget
    # RoPE, not the paper's learned absolute positions: an image token's neighbours sit at fixed offsets (1 left, 8
    # up) wherever its image starts, which rotary attention sees from the first step (docs/demo.md).
    lm_positions: str = "rope"
    # DALL-E's row and column embeddings on image tokens (the demo preset's 8x8 grid): the decoder knows which
    # cell it is drawing without counting from the image's start
    lm_image_grid: int = 8
    # share of pretraining documents in captioning order; the rest teach text -> image. Fewer than the default
    # half makes the decoder read the caption's words more (docs/demo.md)
    pretrain_image_first: float = 0.2
    pretrain_steps: int = 1000
    pretrain_lr: float = 3e-3
    sft_images: int = 600
    sft_steps: int = 500
    sft_lr: float = 1e-3
    train_threads: int = 2  # the training worker holds 1 CPU (Ray Data reads beside it) but uses both cores
    # CFG scale of every generation but the "no CFG" ablation, and the sampling temperature of every generation
    # (with top-p 0.9 / CD-K): chosen by a sweep on a finished run (docs/demo.md); a higher scale draws the colour
    # more often and the shape less often
    guidance: float = 2.0
    temperature: float = 0.5
    # retrieved documents before each headline prompt; the other count is the "retrieval" ablation. Pretraining is
    # retrieval-augmented (K from 0 to 2), but the instruction-tuned decoder drew the asked colour less often with two
    # documents than with none (seeds 1 and 2: 75-83% against 100%; docs/demo.md): its SFT rows carry none
    retrieved: int = 0
    prompts: int = 24  # prompts per group (seen pairs, held-out pairs), each sampled `samples` times
    samples: int = 2
    caption_images: int = 48  # new images per group that the decoder captions
    nll_images: int = 96  # images per figure of the decoder's image loss given the caption

    def data_seed(self, purpose: str) -> int:
        """The seed of the images drawn for one purpose (training, SFT, new images for evaluation)."""
        return self.seed * len(DATA_PURPOSES) + DATA_PURPOSES[purpose]


SMALL = DemoSize(images=60, vq_steps=20, clip_steps=10, vocab_size=300, pretrain_steps=4, sft_images=8,
                 sft_steps=3, prompts=3, samples=1, caption_images=3, nll_images=4)


def _done(folder: Path) -> bool:
    return (folder / DONE).exists()


def _mark_done(folder: Path, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / DONE, {"finished": time.time(), **info})


def _info(folder: Path) -> dict:
    return read_json(folder / DONE)


def _port_of(url_list: Path) -> int:
    first_url = pq.read_table(url_list, columns=["url"]).column("url")[0].as_py()
    return urlparse(first_url).port or 0


def check_workdir(workdir: Path, size: DemoSize) -> None:
    """Record the run's settings in a new work folder; refuse to resume one made with other settings."""
    path = workdir / RUN_CONFIG
    settings = asdict(size)
    if path.exists():
        found = read_json(path)
        if found != settings:
            changed = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
            raise InputError(f"{workdir} holds a demo run with other settings ({', '.join(changed)} differ): "
                             "use another --workdir, or --fresh to start over")
        return
    if any(workdir.iterdir()):
        raise InputError(f"{workdir} is not empty and holds no {RUN_CONFIG}: not a cm3 demo work folder "
                         "(use another --workdir, or --fresh to start over)")
    write_json(path, settings)


def ingest_stage(workdir: Path, size: DemoSize) -> Path:
    raw = workdir / "raw"
    if _done(raw):
        print(f"[ingest] done already: {raw}", flush=True)
        return raw
    url_list = workdir / "urls.parquet"
    seed = size.data_seed("train")
    # serve on the port the existing URL list names, so a resumed ingest sees the same list
    port = _port_of(url_list) if url_list.exists() else 0
    try:
        server = DemoDataServer(n=size.images, seed=seed, split="train", port=port).start()
    except OSError:  # that port is taken now: start the stage over on a free one
        url_list.unlink(missing_ok=True)
        server = DemoDataServer(n=size.images, seed=seed, split="train", port=0).start()
    try:
        if not url_list.exists():
            shutil.rmtree(raw, ignore_errors=True)
            write_url_list(url_list, server.url, size.images, seed=seed, split="train")
        print(f"[ingest] demo data served at {server.url}; URL list {url_list}", flush=True)
        result = run_download(open_url_list(url_list), raw,
                              DownloadSettings(shard_rows=DEMO_SHARD_ROWS, cpus_per_task=0.5), processes=2)
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
    from cm3.tokenizers.vq_training import train_vqgan
    from cm3.tokenizers.vqgan import VQGAN, VQGANConfig

    folder = workdir / "tokenizer"
    if _done(folder):
        print(f"[tokenizer] done already: {folder}", flush=True)
        return folder
    print(f"[tokenizer] training the VQ-GAN (demo preset, {size.vq_steps} steps)", flush=True)
    report = train_vqgan(raw, workdir / "vq", VQGANConfig.preset("demo"), seed=size.seed,
                         options=replace(demo_training_options(), steps=size.vq_steps))
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
    from cm3.tokenizers.clip_training import train_clip

    folder = workdir / "clip"
    if _done(folder):
        return None
    print(f"[clip] training the demo CLIP on Ray ({size.clip_steps} steps, beside the VQ-GAN)", flush=True)
    task = ray.remote(num_cpus=1, max_retries=0)(train_clip)
    options = ClipTrainOptions(steps=size.clip_steps, seed=size.seed, torch_threads=1)
    return task.remote(raw.resolve(), folder.resolve(), options, progress=False)


def finish_clip_stage(workdir: Path, pending) -> dict:
    """Wait for the CLIP task started by ``start_clip_stage``; the identity that tokenize embeds with."""
    import ray
    from cm3.tokenizers.clip_embedder import TRAINED_CONFIG_FILE

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
        result = run_tokenize(raw, tokens, tokenizer, clip=clip)
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
        seq_len=size.seq_len, batch_size=8, batch_tokens=8 * size.seq_len, steps=steps, seed=size.seed,
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
    from cm3.pipeline.sft_tasks import write_task_shards
    from cm3.pipeline.tokenize import tokenizer_identity
    from cm3.synthetic.sft_tasks import demo_tasks
    from cm3.tokenizers.multimodal import MultimodalTokenizer

    folder = workdir / "sft-data"
    if not _done(folder):
        tokenizer = MultimodalTokenizer.load(tokenizer_dir)
        tasks = demo_tasks(tokenizer, size.sft_images, seed=size.data_seed("sft"))
        write_task_shards(tasks, folder, tokenizer.tokens_per_image, 500, tokenizer_identity(tokenizer_dir))
        _mark_done(folder, {"images": size.sft_images})
    return folder


# name -> (whether it swaps the retrieved documents, CFG scale or None for the run's, method): the paper's ablations
# in miniature; the swap draws with K=2 when the run draws with none, and with none otherwise
ABLATIONS = {"retrieval": (True, None, "top_p"), "no_guidance": (False, 1.0, "top_p"), "cd_k": (False, None, "cd_k")}


def evaluate_stage(workdir: Path, checkpoint: Path, index: Path, augmented: Path, tokens: Path,
                   size: DemoSize, pretrained: Path | None = None) -> dict:
    """Generations and captions for seen and held-out (shape, colour) pairs, the ablations, the diagnostics and
    the pictures of the report (``checkpoint``: the instruction-tuned decoder; ``pretrained``, when given, also
    gets the image-loss figures)."""
    from cm3.index.query import Retriever
    from cm3.model.checkpoint import load_checkpoint
    from cm3.model.generation import SamplingConfig, caption_image
    from cm3.pipeline.sft_tasks import TEMPLATES
    from cm3.synthetic.shapes import spec_for
    from cm3.workflows.demo import evaluate

    report = workdir / "report"
    report.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_checkpoint(checkpoint)
    retriever = Retriever(index)
    new = size.data_seed("new")
    groups = {"seen": [spec_for(i, seed=new, split="train") for i in range(size.prompts)],
              "held_out": [spec_for(i, seed=new, split="heldout") for i in range(size.prompts)]}

    def draw(specs, retrieved: int, guidance: float, method: str, variant: int) -> torch.Tensor:
        sampling = SamplingConfig(guidance_scale=guidance, method=method, temperature=size.temperature,
                                  seed=size.seed * 1000 + variant)
        return evaluate.generate_for_specs(model, tokenizer, specs, size.samples, sampling, retriever, retrieved)

    def asked(specs):
        return [spec for spec in specs for _ in range(size.samples)]

    generated = {name: draw(specs, size.retrieved, size.guidance, "top_p", 0) for name, specs in groups.items()}
    text_to_image = {name: _image_figures(evaluate.image_accuracy(images, asked(groups[name])))
                     for name, images in generated.items()}
    ablations = {}
    for variant, (ablation, (swap_retrieval, guidance, method)) in enumerate(ABLATIONS.items(), start=1):
        retrieved = (0 if size.retrieved else 2) if swap_retrieval else size.retrieved
        ablations[ablation] = {"retrieved": retrieved, "guidance": guidance or size.guidance, "method": method}
        for name, specs in groups.items():
            images = draw(specs, retrieved, guidance or size.guidance, method, variant)
            ablations[ablation][name] = _image_figures(evaluate.image_accuracy(images, asked(specs)))
    _generations_picture(generated, {name: asked(specs) for name, specs in groups.items()}, size,
                         report / "generations.png")

    # Captions of new images: seen pairs (other draws than the prompts above) and held-out pairs.
    caption_specs = {name: [spec_for(i, seed=new, split=split) for i in range(size.prompts,
                                                                              size.prompts + size.caption_images)]
                     for name, split in (("seen", "train"), ("held_out", "heldout"))}
    question = TEMPLATES["captioning"][0]
    captions, caption_images = {}, {}
    for name, specs in caption_specs.items():
        caption_images[name] = evaluate.spec_images(specs, tokenizer.vq.config.resolution, as_served=True)
        captions[name] = caption_image(model, tokenizer, caption_images[name], question=question)
    half = GRID_PROMPTS // 2
    image_grid([to_pil(x) for name in captions for x in caption_images[name][:GRID_PROMPTS]],
               [f"{'seen' if name == 'seen' else 'held-out'}: {c}" for name in captions
                for c in captions[name][:GRID_PROMPTS]], cols=half).save(report / "captions.png")

    # The checker's reading of the tokenizer's own reconstructions: what a decoder that reproduced the true codes
    # would score. It tells the VQ-GAN's share of a text->image error from the decoder's.
    originals = torch.cat(list(caption_images.values()))
    reconstructions = tokenizer.decode_image(tokenizer.encode_image(originals))
    vq_reading = evaluate.image_accuracy(reconstructions, [s for specs in caption_specs.values() for s in specs])
    shown = 4
    image_grid([to_pil(x) for x in torch.cat([originals[:shown], reconstructions[:shown]])],
               ["original"] * shown + ["VQ reconstruction"] * shown, cols=4).save(report / "vq_reconstructions.png")
    _retrieval_examples(augmented, tokenizer, report / "retrieval_examples.png")

    n = size.nll_images
    nll_specs = {"training_images": [spec_for(i, seed=size.data_seed("train"), split="train")
                                     for i in range(min(n, size.images))],
                 "training_pairs_new_images": [spec_for(i, seed=new, split="train") for i in range(n)],
                 "held_out_pairs": [spec_for(i, seed=new, split="heldout") for i in range(n)]}
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
    agreement = evaluate.retrieval_agreement(augmented, tokens)
    return {
        "text_to_image": {**text_to_image, "retrieved": size.retrieved, "guidance": size.guidance, "method": "top_p",
                          "temperature": size.temperature,
                          "command": f"cm3 generate PROMPT --checkpoint {checkpoint} --index {index} "
                                     f"--retrieved {size.retrieved} "
                                     f"-n {size.samples} --guidance {size.guidance} --temperature {size.temperature}"},
        "captions": {**{name: {"colour_and_shape": evaluate.caption_accuracy(captions[name], specs)[
                                   "colour_and_shape_named"], "images": len(specs),
                               "examples": captions[name][:4]}
                        for name, specs in caption_specs.items()},
                     "command": f"cm3 caption IMAGE --checkpoint {checkpoint} --question {question!r}"},
        "retrieval": {"agreement": agreement["neighbour_colour_and_shape_agreement"],
                      "neighbours": agreement["neighbours"],
                      "rows_without_neighbours": agreement["rows_without_neighbours"],
                      "command": f"cm3 build-index {tokens} --index {index} --out {augmented}"},
        "ablations": ablations,
        "diagnostics": {"checker_on_vq_reconstructions": _image_figures(vq_reading),
                        "image_nll_given_caption": image_nll, "caption_reliance": reliance},
    }


def _image_figures(accuracy: dict) -> dict:
    """The checker's figures for a set of generated images, named as the report names them."""
    return {"colour": accuracy["colour_accuracy"], "shape": accuracy["shape_accuracy"], "samples": accuracy["images"]}


def _generations_picture(generated: dict, asked: dict, size: DemoSize, path: Path) -> None:
    """The first prompts' samples, seen pairs on the left and held-out pairs on the right, each under its prompt
    and the checker's verdict."""
    from cm3.synthetic.checker import read_attributes

    per_half = min(GRID_PROMPTS * size.samples, len(asked["seen"]), len(asked["held_out"]))
    cells, labels = [], []
    for row in range(0, per_half, size.samples):
        for name in ("seen", "held_out"):
            for i in range(row, min(row + size.samples, per_half)):
                picture = to_pil(generated[name][i])
                reading = read_attributes(picture)
                spec = asked[name][i]
                verdict = "colour ok" if reading.ok and reading.colour == spec.colour else "colour wrong"
                verdict += ", shape ok" if reading.ok and reading.shape == spec.shape else ", shape wrong"
                cells.append(picture)
                labels.append(f"{'seen' if name == 'seen' else 'held-out'}: {spec.caption} ({verdict})")
    image_grid(cells, labels, cols=2 * size.samples, caption_lines=4).save(path)


def _retrieval_examples(augmented: Path, tokenizer, path: Path, rows: int = 4) -> None:
    """Each query image followed by its retrieved neighbours, decoded from their VQ codes."""
    table = pq.read_table(parquet_path(augmented, complete_shards(augmented)[0])).slice(0, rows)
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
    for shard_id in complete_shards(raw):
        table = pq.read_table(parquet_path(raw, shard_id), columns=["jpg", "caption", "status"])
        for jpg, caption, status in zip(*(table.column(c).to_pylist() for c in ("jpg", "caption", "status"))):
            if status == "success":
                reading = read_attributes(decode(jpg).convert("RGB"))
                checked += 1
                agree_colour += f" {reading.colour} " in f" {caption} "
                agree_shape += f" {reading.shape}" in caption
    summary = read_json(raw / SUMMARY_FILE)
    return {"urls": summary["count"], "success_rate": summary["success_rate"],
            "images_per_second": summary.get("this_run", {}).get("images_per_second"),
            "checker_colour_agreement": round(agree_colour / max(checked, 1), 4),
            "checker_shape_agreement": round(agree_shape / max(checked, 1), 4)}


TARGETS = {"text_to_image.seen.colour": 0.9, "text_to_image.seen.shape": 0.8, "captions.seen.colour_and_shape": 0.9,
           "retrieval.agreement": 0.9}


def headline(metrics: dict) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, command) rows: what a person wants to know first."""
    def pct(value) -> str:
        return f"{value:.0%}"

    t2i, captions, ablations = metrics["text_to_image"], metrics["captions"], metrics["ablations"]
    rows = [
        ("text -> image, seen pairs: colour / shape", f"{pct(t2i['seen']['colour'])} / {pct(t2i['seen']['shape'])} "
         f"({t2i['seen']['samples']} samples)", ">= 90% / >= 80%", t2i["command"]),
        ("image -> text, seen pairs: captions naming colour and shape", f"{pct(captions['seen']['colour_and_shape'])} "
         f"({captions['seen']['images']} images)", ">= 90%", captions["command"]),
        ("text -> image, held-out pairs: colour / shape", f"{pct(t2i['held_out']['colour'])} / "
         f"{pct(t2i['held_out']['shape'])} ({t2i['held_out']['samples']} samples)", "goal >= 50%", t2i["command"]),
        ("image -> text, held-out pairs", f"{pct(captions['held_out']['colour_and_shape'])} "
         f"({captions['held_out']['images']} images)", "goal >= 50%", captions["command"]),
        ("retrieval: neighbours sharing colour and shape", pct(metrics["retrieval"]["agreement"]), ">= 90%",
         metrics["retrieval"]["command"]),
    ]
    names = {"retrieval": f"K={ablations['retrieval']['retrieved']} retrieved documents",
             "no_guidance": "no CFG (scale 1)", "cd_k": "CD-K instead of top-p"}
    for key, result in ablations.items():
        rows.append((f"ablation, {names.get(key, key)}: seen / held-out colour, shape",
                     f"{pct(result['seen']['colour'])}, {pct(result['seen']['shape'])} / "
                     f"{pct(result['held_out']['colour'])}, {pct(result['held_out']['shape'])}", "",
                     t2i["command"].replace(f"--retrieved {t2i['retrieved']}", f"--retrieved {result['retrieved']}")
                     .replace(f"--guidance {t2i['guidance']}", f"--guidance {result['guidance']}")
                     + (" --method cd_k" if result["method"] == "cd_k" else "")))
    rows.append(("wall clock, Ray's start to the report", f"{metrics['wall_minutes']:.1f} min", "<= 20 min", ""))
    return rows


def write_report(workdir: Path, metrics: dict) -> Path:
    report = workdir / "report"
    report.mkdir(parents=True, exist_ok=True)
    for name, source in (("loss_pretrain.png", workdir / "train" / "cm3-pretrain" / "loss_curve.png"),
                         ("loss_sft.png", workdir / "train" / "cm3-sft" / "loss_curve.png"),
                         ("vq_training_reconstructions.png", workdir / "vq" / "reconstructions.png")):
        if source.exists():
            shutil.copy(source, report / name)
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2))
    lines = ["# cm3 demo report", "", f"Work folder: `{workdir}`; every figure is in `metrics.json`, scored by the "
             "demo data's own pixel checker. Seen pairs: (shape, colour) pairs of the training data, drawn anew; "
             "held-out pairs: never seen together in training.", ""]
    if "text_to_image" in metrics:
        lines += ["| figure | value | target | command |", "|---|---|---|---|"]
        lines += [f"| {figure} | {value} | {target} | `{command}` |" if command else
                  f"| {figure} | {value} | {target} | |" for figure, value, target, command in headline(metrics)]
        lines += ["", "![generations](generations.png)", "", "![captions](captions.png)", ""]
    lines += ["## All figures", ""]
    for section, values in metrics.items():
        lines.append(f"- {section}: `{json.dumps(values)}`")
    pictures = sorted(p.name for p in report.glob("*.png") if p.name not in ("generations.png", "captions.png"))
    lines += ["", "## More pictures", ""] + [f"![{name}]({name})" for name in pictures]
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
    check_workdir(workdir, size)
    started = time.time()
    connect(ray_address)
    raw = ingest_stage(workdir, size)
    metrics: dict = {"ingest": {**ingest_metrics(raw), "command": f"cm3 ingest {workdir / 'urls.parquet'} --out {raw}"}}
    if stages != "ingest":
        pending_clip = start_clip_stage(workdir, raw, size)
        tokenizer = tokenizer_stage(workdir, raw, size)
        vq_options = demo_training_options()
        metrics["tokenizer"] = {**_info(tokenizer)["vq"], "preset": "demo (8x8 = 64 tokens per image)",
                                "command": f"cm3 tokenizer train-vq --data {raw} --out {workdir / 'vq'} --preset demo"
                                           f" --steps {size.vq_steps} --batch-size {vq_options.batch_size}"
                                           f" --lr {vq_options.lr} --threads 1"}
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
    metrics["wall_minutes"] = round((time.time() - started) / 60, 2)
    metrics["run"] = {"size": asdict(size)}
    write_report(workdir, metrics)
    return metrics

