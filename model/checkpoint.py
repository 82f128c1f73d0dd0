"""Inference checkpoints: the decoder's weights with the tokenizer they were trained with, in one folder.

    CKPT/model.safetensors   CKPT/config.json   (CM3.save_pretrained)
    CKPT/tokenizer/                             (MultimodalTokenizer.save)
    CKPT/checkpoint.json                        (what produced it; written last, the commit marker)

A checkpoint carries its tokenizer so that ids can never be decoded with another vocabulary;
loading checks that the decoder's vocabulary size equals the tokenizer's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cm3.core.errors import InputError
from cm3.core.files import atomic_folder
from cm3.core.intact import load_json, safetensors_header
from cm3.model.config import CM3Config
from cm3.model.decoder import CM3, CONFIG_NAME, TOKENIZER_DIR, check_weights
from cm3.tokenizers import vqgan
from cm3.tokenizers.multimodal import TEXT_FILE, VOCAB_FILE, VQ_DIR, MultimodalTokenizer

MARKER = "checkpoint.json"


def save_checkpoint(directory: str | os.PathLike, model: CM3, tokenizer: MultimodalTokenizer,
                    info: dict | None = None) -> Path:
    """Write the whole folder at once (``atomic_folder``): ``directory`` holds the old checkpoint or the new one."""
    if model.config.vocab_size != tokenizer.vocab.size:
        raise ValueError(f"model vocab_size {model.config.vocab_size} != tokenizer vocabulary size "
                         f"{tokenizer.vocab.size}")
    target = Path(directory)
    with atomic_folder(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save(staging / TOKENIZER_DIR)
        (staging / MARKER).write_text(json.dumps({"format_version": 1, **(info or {})}, indent=2) + "\n")
    return target


def check_checkpoint(directory: str | os.PathLike) -> Path:
    """Check that a folder is a whole checkpoint without loading its weights (JSON files parse, safetensors
    headers cover their files): InputError naming the damaged file. A server or a Ray job calls it in the driver,
    where the error reaches the user, instead of in a replica or worker that Ray would restart."""
    root = Path(directory)
    if not (root / MARKER).is_file():
        raise InputError(f"{root}: not a cm3 checkpoint ({MARKER} is missing)")
    load_json(root / MARKER)
    try:
        CM3Config.from_dict(load_json(root / CONFIG_NAME))
    except (TypeError, ValueError) as err:
        raise InputError(f"{root / CONFIG_NAME}: not a cm3 decoder config ({err})") from err
    check_weights(root)
    tokenizer = root / TOKENIZER_DIR
    load_json(tokenizer / VOCAB_FILE)
    load_json(tokenizer / TEXT_FILE)
    load_json(tokenizer / VQ_DIR / vqgan.CONFIG_NAME)
    safetensors_header(tokenizer / VQ_DIR / vqgan.WEIGHTS_NAME)
    return root


def _checkpoint_root(directory: str | os.PathLike) -> Path:
    """The folder, once its commit marker shows a whole checkpoint was written there."""
    root = Path(directory)
    if not (root / MARKER).is_file():
        raise FileNotFoundError(f"{root}: not a cm3 checkpoint ({MARKER} is missing)")
    return root


def load_tokenizer_and_config(directory: str | os.PathLike) -> tuple[CM3Config, MultimodalTokenizer]:
    """The decoder's config and the tokenizer on the CPU, without the decoder's weights: what a process needs
    to validate and tokenize requests for a model that runs elsewhere (`cm3 serve`'s HTTP ingress)."""
    root = _checkpoint_root(directory)
    return CM3Config.from_dict(load_json(root / CONFIG_NAME)), MultimodalTokenizer.load(root / TOKENIZER_DIR)


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[CM3, MultimodalTokenizer]:
    """(model in eval mode, tokenizer); clear errors for a folder that is not a whole checkpoint."""
    root = _checkpoint_root(directory)
    tokenizer = MultimodalTokenizer.load(root / TOKENIZER_DIR, device=device)
    try:
        model = CM3.from_pretrained(root, device=device, dtype=dtype, expected_vocab_size=tokenizer.vocab.size)
    except ValueError as err:
        raise ValueError(f"{root}: the decoder does not match {root / TOKENIZER_DIR}: {err}") from err
    model.image_tokenizer = tokenizer  # `model(images, caption)` lays documents out with it
    return model.eval(), tokenizer
