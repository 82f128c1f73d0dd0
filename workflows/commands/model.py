"""Commands for the CM3 decoder: create a checkpoint, generate images, caption images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cm3.core.errors import InputError
from cm3.index.retrieval import DEFAULT_K
from cm3.model.sampling_options import CAPTION_METHOD, CAPTION_TOKENS, SamplingConfig
from cm3.workflows.commands.common import fail
from cm3.workflows.serve_options import ServeOptions

SAMPLING = SamplingConfig()  # the defaults of `cm3 generate` (and of `cm3 caption`'s seed)
SERVE = ServeOptions(checkpoint="")  # the defaults of `cm3 serve`


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


def inference_dtype(device: str):
    """bf16 weights on a GPU (a converted 7B then needs 14 GB, not 28), the saved dtype on the CPU."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else None


def _sampling(**fields) -> SamplingConfig:
    """The command's sampling options as a SamplingConfig, or exit 2 naming the bad one."""
    try:
        return SamplingConfig(**fields)
    except ValueError as err:
        fail(str(err))


def generate(
    prompt: str = typer.Argument(..., help="What the image should show."),
    checkpoint: Path = typer.Option(..., help="Checkpoint folder (decoder + tokenizer)."),
    n: int = typer.Option(4, "-n", min=1, help="Images to sample."),
    out: Path = typer.Option(Path("generated.png"), help="PNG grid to write (the images also go beside it)."),
    method: str = typer.Option(SAMPLING.method,
                               help="top_p, cd_k, greedy, or mix (half top-p, half CD-K as in the paper)."),
    guidance: float = typer.Option(SAMPLING.guidance_scale, help="Classifier-free guidance scale (1: none); with "
                                                                 "--image-guidance, the text scale."),
    image_guidance: Optional[float] = typer.Option(SAMPLING.image_guidance_scale,
                                                   help="Chameleon's guidance: scale of the prompt's images apart "
                                                        "from its text (Chameleon's default 1.2)."),
    temperature: float = typer.Option(SAMPLING.temperature, help="Sampling temperature."),
    top_p: float = typer.Option(SAMPLING.top_p, help="Nucleus mass."),
    cd_alpha: float = typer.Option(SAMPLING.cd_alpha, help="CD-K plausibility cut-off alpha."),
    cd_k: int = typer.Option(SAMPLING.cd_k, help="CD-K: compare with the k-th largest expert probability."),
    seed: int = typer.Option(SAMPLING.seed, help="Sampling seed."),
    index: Optional[Path] = typer.Option(None, help="Retrieve documents for the prompt from this index and prepend them."),
    retrieved: int = typer.Option(DEFAULT_K, min=0, help="With --index: how many documents to prepend."),
    rerank: bool = typer.Option(False, "--rerank", help="Order the N images by CLIP score (the index's CLIP model)."),
    device: str = typer.Option("cpu", help="cpu or cuda (bf16 weights)."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="Compile the decode step (default: on CUDA only)."),
    int8: bool = typer.Option(False, "--int8", help="int8 weight-only linear layers (torchao)."),
) -> None:
    """Text to image: sample N images for a prompt with CFG and top-p or CD-K, save a PNG grid.

    Examples:

      cm3 generate "a small red circle at the top left on a white background" --checkpoint ckpt/sft -n 8

      cm3 generate "a blue square" --checkpoint ckpt/sft --method mix --guidance 4 --out blue.png

      cm3 generate "a green circle" --checkpoint ckpt/sft --index data/index -n 8 --rerank

      cm3 generate "a cat on a sofa" --checkpoint ckpt/anole-7b --device cuda --guidance 3 --image-guidance 1.2 \
          --temperature 0.7
    """
    from cm3.core.images import to_pil
    from cm3.model.checkpoint import load_checkpoint
    from cm3.model.engine import ImageEngine, quantize_int8
    from cm3.model.generation import rerank_by_clip, text_to_image, unconditional_prompt
    from cm3.workflows.report import image_grid

    sampling = _sampling(method="top_p" if method == "mix" else method, guidance_scale=guidance,
                         image_guidance_scale=image_guidance, temperature=temperature, top_p=top_p,
                         cd_alpha=cd_alpha, cd_k=cd_k, seed=seed)
    if rerank and index is None:
        fail("--rerank scores with the CLIP model of an index: give --index too")
    try:
        model, tokenizer = load_checkpoint(checkpoint, device=device, dtype=inference_dtype(device))
        if int8:
            quantize_int8(model)
        engine = ImageEngine(model, tokenizer.vocab, unconditional_prompt(tokenizer.vocab), tokenizer.tokens_per_image,
                             n, compile=device.startswith("cuda") if compile is None else compile, cd_k=cd_k,
                             image_guidance=image_guidance is not None)
        retriever = None
        if index is not None:
            from cm3.index.query import Retriever

            retriever = Retriever(index)
        docs = retriever.for_text(prompt, retrieved) if retriever is not None and retrieved else None
        images, _ = text_to_image(model, tokenizer, prompt, n, sampling, retrieved=docs, mix=method == "mix",
                                  engine=engine)
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


def caption(
    images: list[Path] = typer.Argument(..., help="Image files (any size; center-cropped to the tokenizer's)."),
    checkpoint: Path = typer.Option(..., help="Checkpoint folder (decoder + tokenizer)."),
    question: Optional[str] = typer.Option(None, help="Ask a question instead (VQA layout)."),
    method: str = typer.Option(CAPTION_METHOD, help="greedy or top_p."),
    max_new_tokens: int = typer.Option(CAPTION_TOKENS, min=1, help="Longest answer."),
    seed: int = typer.Option(SAMPLING.seed, help="Sampling seed (top_p)."),
    device: str = typer.Option("cpu", help="cpu or cuda (bf16 weights)."),
) -> None:
    """Image to text: caption images, or answer a question about them.

    Examples:

      cm3 caption photo.jpg --checkpoint ckpt/sft

      cm3 caption shape.png --checkpoint ckpt/sft --question "what colour is the shape?"
    """
    import torch

    from cm3.core.images import load_image_tensor
    from cm3.model.checkpoint import load_checkpoint
    from cm3.model.generation import caption_image

    for path in images:
        if not path.is_file():
            fail(f"{path}: no such image file")
    sampling = _sampling(method=method, seed=seed)
    try:
        model, tokenizer = load_checkpoint(checkpoint, device=device, dtype=inference_dtype(device))
        size = tokenizer.vq.config.resolution
        batch = torch.cat([load_image_tensor(path, size) for path in images]).to(device)
        answers = caption_image(model, tokenizer, batch, question=question, sampling=sampling,
                                max_new_tokens=max_new_tokens)
    except (FileNotFoundError, ValueError, OSError) as err:
        fail(str(err))
    for path, answer in zip(images, answers):
        typer.echo(f"{path}\t{answer}")


def serve_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder (decoder + tokenizer), readable by every replica."),
    host: str = typer.Option(SERVE.host, help="Address the HTTP proxy listens on (0.0.0.0: every interface)."),
    port: int = typer.Option(SERVE.port, min=1, max=65535, help="HTTP port."),
    ray_address: Optional[str] = typer.Option(SERVE.ray_address, help="Join this Ray cluster (host:port or auto) instead of "
                                                         "starting a local one."),
    replicas: int = typer.Option(SERVE.replicas, min=1, help="Model replicas (one GPU each when the cluster has GPUs)."),
    device: str = typer.Option(SERVE.device, help="auto (GPU when the cluster has one), cpu or cuda."),
    cpus_per_replica: int = typer.Option(SERVE.cpus_per_replica, min=1,
                                         help="CPU replicas: the CPUs each reserves in Ray and its torch threads."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="Compile the decode step (default: on CUDA only)."),
    int8: bool = typer.Option(SERVE.int8, "--int8", help="int8 weight-only linear layers (torchao)."),
    max_batch_images: int = typer.Option(SERVE.max_batch_images, min=1, help="Images decoded together; also the largest n."),
    batch_wait_ms: float = typer.Option(SERVE.batch_wait_ms, min=0, help="How long a batch waits to fill."),
    max_queued: int = typer.Option(SERVE.max_queued_requests, min=1, help="Requests queued beyond the replicas' before 503."),
    max_body_bytes: int = typer.Option(SERVE.max_body_bytes, min=1024, help="Largest request body (413 beyond)."),
    index: Optional[Path] = typer.Option(None, help="A cm3 build-index folder: requests may ask for retrieved docs."),
) -> None:
    """Serve text -> image and captioning over HTTP JSON on Ray Serve, with dynamic batching.

    POST /generate, POST /caption, GET /health (see docs/serving.md). Stops on Ctrl-C or SIGTERM, taking down
    the local Ray it started (a joined cluster keeps running; only this application is removed).

    Examples:

      cm3 serve ckpt/sft

      cm3 serve ckpt/sft --host 0.0.0.0 --port 8080 --ray-address 10.0.0.1:6379 --replicas 4
    """
    import signal
    import threading

    from cm3.core.errors import InputError
    from cm3.model.checkpoint import check_checkpoint
    from cm3.workflows.serve import run

    try:
        check_checkpoint(checkpoint)  # a damaged file is named here, not in a replica that Ray Serve restarts
    except InputError as err:
        fail(str(err))
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        fail(f"--device {device!r}: expected auto, cpu or cuda")
    if index is not None and not index.is_dir():
        fail(f"--index {index}: no such folder")
    options = ServeOptions(str(checkpoint), host=host, port=port, ray_address=ray_address, replicas=replicas,
                           cpus_per_replica=cpus_per_replica, device=device, compile=compile, int8=int8,
                           max_batch_images=max_batch_images,
                           batch_wait_ms=batch_wait_ms, max_queued_requests=max_queued,
                           max_body_bytes=max_body_bytes, index=None if index is None else str(index))
    stop, serving = threading.Event(), threading.Event()

    def on_signal(*_) -> None:
        stop.set()
        if not serving.is_set():  # still starting: interrupt it (run() then takes down what it started)
            raise KeyboardInterrupt

    def handle_signals() -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, on_signal)

    handle_signals()

    def ready() -> None:
        serving.set()
        typer.echo(f"cm3 serve: http://{host}:{port} (POST /generate, POST /caption, GET /health); Ctrl-C stops",
                   err=True)

    try:
        run(options, stop, ready=ready, on_connect=handle_signals)
    except KeyboardInterrupt:
        fail("stopped while starting", code=130)
    typer.echo("cm3 serve: stopped", err=True)
