"""Benchmark: images/s of `generate_image_tokens` with CFG against Hugging Face `generate()`, in one run.

Ours decodes `--images` images with classifier-free guidance, i.e. 2 * images rows (cond + uncond) over the
static KV cache, top-p 0.9. The peer is `transformers.OPTForCausalLM` of the same shape (layers, width, heads,
4x ReLU MLP, pre-LN, no biases, vocab, positions) sampling the same number of rows and new tokens with top-p 0.9
and its own cache. HF does no guidance math and keeps its whole vocabulary, which favours it in work done per
step; images/s counts rows / 2 for both. Weights are random: speed does not depend on them.

Targets: on a GPU (350m, bf16, H100/H200) >= 10 images/s and >= 10x HF; on a CPU (tiny) >= 2x HF.

    .venv/bin/python benchmarks/generate.py                          # tiny preset, CPU, 64 tokens
    python benchmarks/generate.py --preset 350m --device cuda --compile     # 1024 tokens, bf16

transformers must be importable (it is not a cm3 dependency): see `hf_peer.require_transformers`.
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the standard library's `tokenize` (which torch imports) while this folder is
# first on the import path, as it is for a script run from here: move it last, where `hf_peer` is still found.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse  # noqa: E402

import torch  # noqa: E402
from hf_peer import add_run_arguments, best_seconds, opt_peer, start_run  # noqa: E402

from cm3.model.config import CM3Config  # noqa: E402
from cm3.model.decoder import CM3  # noqa: E402
from cm3.model.generation import SamplingConfig, generate_image_tokens, image_prompt  # noqa: E402


def build_ours(config: CM3Config, device: torch.device, dtype: torch.dtype) -> CM3:
    model = CM3(config)
    with torch.no_grad():
        for weight in model.parameters():  # non-zero out-projections: a realistic (non-identity) network
            weight.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--images", type=int, default=16, help="images per batch; CFG decodes twice as many rows")
    parser.add_argument("--tokens", type=int, default=None,
                        help="image tokens per image (default: 64 for tiny, the demo's; 1024 otherwise)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per row, <eod> and <break> included")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile ours (reduce-overhead on CUDA)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender after one warm-up")
    args = parser.parse_args()

    transformers, device, vocab = start_run(args)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
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

    hf = opt_peer(transformers, config, vocab, device, dtype).eval()
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
