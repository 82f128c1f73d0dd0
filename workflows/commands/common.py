"""Shared pieces of the command modules: failing with exit code 2, the CLIP options, summaries."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """The error as the command's last word, and its exit code. A Ray driver disconnects first (what it would do
    at exit anyway): Ray streams worker logs to the driver's stderr from a thread, and a failed task's traceback
    could otherwise arrive after the error."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
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

        from cm3.tokenizers.clip_embedder import TRAINED_CONFIG_FILE

        config_path = clip_dir / TRAINED_CONFIG_FILE
        if not config_path.is_file():
            fail(f"{clip_dir}: not a trained CLIP folder ({TRAINED_CONFIG_FILE} is missing); see cm3 clip train")
        config = json.loads(config_path.read_text())
        return {"model_name": config["model_name"], "pretrained": str((clip_dir / config["checkpoint"]).resolve())}
    if clip_model is not None:
        from cm3.tokenizers.clip_embedder import check_model_source

        try:
            check_model_source(clip_model, clip_pretrained)
        except (ValueError, FileNotFoundError) as err:
            fail(str(err))
        return {"model_name": clip_model, "pretrained": clip_pretrained}
    return None


def json_summary(report: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items()
                     if isinstance(v, (int, float)))


def memory_size_text(size: int) -> str:
    """Bytes as --memory-budget writes them (binary units, as ``parse_bytes`` reads them): 4294967296 -> 4GB."""
    for power, unit in ((4, "T"), (3, "G"), (2, "M"), (1, "K")):
        if size % 1024**power == 0:
            return f"{size // 1024**power}{unit}B"
    return str(size)


def parse_bytes(text: str) -> int:
    """--memory-budget as bytes, or exit 2 saying what a size looks like."""
    from cm3.index.faiss_index import parse_memory_size

    try:
        return parse_memory_size(text)
    except ValueError:
        fail(f"--memory-budget {text!r}: expected a size such as 512MB or 4GB")


def training_device(name: str):
    """``--device``: "auto" is the first GPU when torch sees one, else the CPU; anything else must name a device
    torch has here (a ValueError, so the command exits with a clear message, not a CUDA trace)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: torch sees no CUDA GPU on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto")
    return device
