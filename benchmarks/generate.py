"""Benchmark: images/s of `generate_image_tokens` with CFG against Hugging Face `generate()`, in one run.

Ours decodes `--images` images with classifier-free guidance, i.e. 2 * images rows (cond + uncond) over the
static KV cache, top-p 0.9. The peer is `transformers.OPTForCausalLM` of the same shape (layers, width, heads,
4x ReLU MLP, pre-LN, no biases, vocab, positions) sampling the same number of rows and new tokens with top-p 0.9
and its own cache. HF does no guidance math and keeps its whole vocabulary, which favours it in work done per
step; images/s counts rows / 2 for both. Weights are random: speed does not depend on them.

Targets: on a GPU (350m, bf16, H100/H200) >= 10 images/s and >= 10x HF; on a CPU (tiny) >= 2x HF.

    .venv/bin/python benchmarks/generate.py                          # tiny preset, CPU, 64 tokens
    python benchmarks/generate.py --preset 350m --device cuda --compile     # 1024 tokens, bf16

transformers must be importable (it is not a cm3 dependency): see `require_transformers`.
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the standard library's `tokenize` (which torch imports) when this folder is on
# the import path, as it is for a script run from here: drop it before anything else is imported.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from cm3.model.config import CM3Config  # noqa: E402
from cm3.model.decoder import CM3  # noqa: E402
from cm3.model.generation import SamplingConfig, generate_image_tokens, image_prompt  # noqa: E402
from cm3.tokenizers.vocabulary import Vocabulary  # noqa: E402

# The demo's joint vocabulary (8192 BPE, 512 codes, 64 tokens/image) for tiny; the paper's (56,320 BPE,
# 8192 codes, 1024 tokens/image) for the real presets.
VOCABS = {"tiny": Vocabulary(text_vocab_size=8192, image_vocab_size=512)}
PAPER_VOCAB = Vocabulary(text_vocab_size=56_320, image_vocab_size=8192)


def require_transformers():
    try:
        import transformers
    except ImportError:
        sys.exit("transformers is not importable. Install it outside the project's venv, e.g.\n"
                 "  .venv/bin/python -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install transformers\n"
                 "  echo \"import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')\" \\\n"
                 "    > /tmp/hfvenv/lib/python3.11/site-packages/cm3_venv.pth\n"
                 "then run this script with /tmp/hfvenv/bin/python.")
    return transformers


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_seconds(contenders: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Fastest of `repeats` calls each, the contenders taking turns so that load on a shared machine hits both
    alike; the first call of each is a warm-up and not counted."""
    best = {name: float("inf") for name in contenders}
    for turn in range(repeats + 1):
        for name, fn in contenders.items():
            elapsed = seconds(fn, device)
            if turn:
                best[name] = min(best[name], elapsed)
    return best


def build_ours(config: CM3Config, device: torch.device, dtype: torch.dtype) -> CM3:
    model = CM3(config)
    with torch.no_grad():
        for weight in model.parameters():  # non-zero out-projections: a realistic (non-identity) network
            weight.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval()


def build_hf(transformers, config: CM3Config, vocab: Vocabulary, device: torch.device, dtype: torch.dtype):
    opt = transformers.OPTConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layers,
        ffn_dim=config.mlp_hidden, num_attention_heads=config.n_heads, max_position_embeddings=config.max_seq_len,
        do_layer_norm_before=True, enable_bias=False, layer_norm_elementwise_affine=False,
        word_embed_proj_dim=config.d_model, dropout=0.0, attention_dropout=0.0, activation_function="relu",
        pad_token_id=vocab.pad, bos_token_id=vocab.eod, eos_token_id=vocab.eod, tie_word_embeddings=True)
    model = transformers.OPTForCausalLM._from_config(opt, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--images", type=int, default=16, help="images per batch; CFG decodes twice as many rows")
    parser.add_argument("--tokens", type=int, default=None,
                        help="image tokens per image (default: 64 for tiny, the demo's; 1024 otherwise)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per row, <eod> and <break> included")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile ours (reduce-overhead on CUDA)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender after one warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()

    transformers = require_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    vocab = VOCABS.get(args.preset, PAPER_VOCAB)
    tokens = args.tokens or (64 if args.preset == "tiny" else 1024)
    config = CM3Config.from_preset(args.preset, vocab_size=vocab.size)
    rows = 2 * args.images

    torch.manual_seed(0)
    ours = build_ours(config, device, dtype)
    step_model = torch.compile(ours, mode="reduce-overhead" if device.type == "cuda" else "default") \
        if args.compile else ours
    caption = [vocab.text_offset + i for i in range(args.prompt_len - 2)]
    prompts = [image_prompt(vocab, caption)] * args.images
    sampling = SamplingConfig(guidance_scale=3.0, top_p=0.9, seed=0)

    def run_ours():
        generate_image_tokens(step_model, vocab, prompts, tokens, sampling)

    hf = build_hf(transformers, config, vocab, device, dtype)
    input_ids = torch.randint(vocab.text_offset, vocab.image_offset, (rows, args.prompt_len), device=device)

    def run_hf():
        with torch.inference_mode():
            hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                        min_new_tokens=tokens, do_sample=True, top_p=0.9, top_k=0, use_cache=True)

    timings = best_seconds({"cm3 generate (CFG)": run_ours,
                            f"HF transformers {transformers.__version__} OPT generate()": run_hf}, args.repeats, device)

    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"preset {args.preset} ({config.n_layers} layers, d {config.d_model}, vocab {vocab.size}), {name}, "
          f"{str(dtype).removeprefix('torch.')}, prompt {args.prompt_len}, compile {args.compile}, "
          f"best of {args.repeats}")
    header = ("contender", "rows", "new tokens", "seconds", "images/s", "tokens/s", "ratio", "target met")
    print(" | ".join(header))
    peer = list(timings.values())[1]
    for contender, s in timings.items():
        ratio = peer / s
        ours_row = contender.startswith("cm3")
        target = (ratio >= 10 and args.images / s >= 10) if cuda else ratio >= 2
        print(" | ".join([contender, str(rows), str(tokens), f"{s:.3f}", f"{args.images / s:.2f}",
                          f"{rows * tokens / s:.0f}", f"{ratio:.2f}x", ("yes" if target else "NO") if ours_row else "-"]))


if __name__ == "__main__":
    main()
