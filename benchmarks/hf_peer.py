"""What `generate.py` and `train.py` share: their common flags, the Hugging Face OPT peer of a cm3 config, the
vocabularies both run with, and CUDA-synchronised timing with the contenders taking turns.

Imported by those scripts, which move this folder to the end of `sys.path` first: `benchmarks/tokenize.py`
would otherwise shadow the standard library's `tokenize`, which torch imports.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from cm3.model.config import CM3Config
from cm3.tokenizers.vocabulary import Vocabulary

# The demo's joint vocabulary (8192 BPE, 512 codes) for tiny; the paper's (56,320 BPE, 8192 codes) otherwise.
VOCABS = {"tiny": Vocabulary(text_vocab_size=8192, image_vocab_size=512)}
PAPER_VOCAB = Vocabulary(text_vocab_size=56_320, image_vocab_size=8192)


def vocabulary_for(preset: str) -> Vocabulary:
    return VOCABS.get(preset, PAPER_VOCAB)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags both benchmarks take: the decoder preset, the device and torch's CPU threads."""
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def start_run(args: argparse.Namespace) -> tuple[object, torch.device, Vocabulary]:
    """(the transformers module, the device, the preset's vocabulary), torch's CPU threads set as asked."""
    transformers = require_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)
    return transformers, torch.device(args.device), vocabulary_for(args.preset)


def require_transformers():
    """The `transformers` module, or exit saying how to install it (the `interop` extra; cm3's runtime has no use
    for it)."""
    try:
        import transformers
    except ImportError:
        sys.exit("transformers is not importable: install the pinned test/interop extra,\n"
                 "  .venv/bin/pip install -c constraints.txt -e '.[interop]'")
    return transformers


def opt_peer(transformers, config: CM3Config, vocab: Vocabulary, device: torch.device,
             dtype: torch.dtype = torch.float32):
    """`OPTForCausalLM` (sdpa) of cm3's shape: layers, width, heads, 4x ReLU MLP, pre-LN without affine
    parameters, no biases, tied embeddings, the same vocabulary and positions."""
    opt = transformers.OPTConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layers,
        ffn_dim=config.mlp_hidden, num_attention_heads=config.n_heads, max_position_embeddings=config.max_seq_len,
        do_layer_norm_before=True, enable_bias=False, layer_norm_elementwise_affine=False,
        word_embed_proj_dim=config.d_model, dropout=0.0, attention_dropout=0.0, activation_function="relu",
        pad_token_id=vocab.pad, bos_token_id=vocab.eod, eos_token_id=vocab.eod, tie_word_embeddings=True)
    return transformers.OPTForCausalLM._from_config(opt, attn_implementation="sdpa", dtype=dtype).to(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call, with the GPU's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_seconds(contenders: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, float]:
    """Fastest of ``rounds`` calls each after one warm-up call (compilation, caches). The contenders take
    turns, in reversed order every other round, so that load on a shared machine hits both alike."""
    for fn in contenders.values():
        fn()
    best = {name: float("inf") for name in contenders}
    for round_ in range(rounds):
        order = list(contenders.items())
        for name, fn in order if round_ % 2 == 0 else order[::-1]:
            best[name] = min(best[name], seconds(fn, device))
    return best
