"""Commands for the CM3 decoder: create a checkpoint, generate images, caption images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cm3.core.errors import InputError
from cm3.index.retrieval import DEFAULT_K
from cm3.model.sampling_options import CAPTION_METHOD, CAPTION_TOKENS, SamplingConfig
from cm3.workflows.commands.common import fail

SAMPLING = SamplingConfig()  # the defaults of `cm3 generate` (and of `cm3 caption`'s seed)


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
    from cm3.model.generation import rerank_by_clip, text_to_image
    from cm3.workflows.report import image_grid

    sampling = _sampling(method="top_p" if method == "mix" else method, guidance_scale=guidance,
                         image_guidance_scale=image_guidance, temperature=temperature, top_p=top_p,
                         cd_alpha=cd_alpha, cd_k=cd_k, seed=seed)
    if rerank and index is None:
        fail("--rerank scores with the CLIP model of an index: give --index too")
    try:
        model, tokenizer = load_checkpoint(checkpoint, device=device, dtype=inference_dtype(device))
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
