"""Benchmark: images/s of the decode engine (text -> image with CFG) against Hugging Face `generate()` and against
the memory-bandwidth bound of the device, measured in one run.

The engine decodes `--images` images with classifier-free guidance, i.e. 2 * images rows (cond + uncond), top-p
0.9, one prompt prefilled once and tiled. The peer is `transformers.OPTForCausalLM` of the same shape (layers,
width, heads, 4x ReLU MLP, pre-LN, no biases, vocab, positions) sampling the same number of rows and new tokens
with top-p 0.9 and its own cache; it does no guidance math and keeps its whole vocabulary, which favours it in
work per step; images/s counts rows / 2 for both. Weights are random: speed does not depend on them.

The bound: every decode step must read the weights once and the live part of the KV cache once, so
sum over steps of (weight bytes + live cache bytes) / bandwidth, with the bandwidth measured here by a large
device-to-device copy. `--int8` adds the engine with int8 weight-only layers and how many of its codes equal the
full-precision engine's under the same seed.

Targets: GPU (350m, bf16, 1,024 tokens, H100/H200): >= 20 images/s at 16 images and >= 25 at 64, >= 15x HF.
CPU (tiny): >= 3x HF.

    .venv/bin/python benchmarks/generate.py                                  # tiny preset, CPU, 64 tokens
    python benchmarks/generate.py --preset 350m --images 16 64               # CUDA: compiled + CUDA graphs

transformers must be importable (`pip install -c constraints.txt -e '.[interop]'`).
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the standard library's `tokenize` (which torch imports) while this folder is
# first on the import path, as it is for a script run from here: move it last, where `hf_peer` is still found.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse  # noqa: E402
import copy  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from hf_peer import add_run_arguments, best_seconds, opt_peer, start_run  # noqa: E402

from cm3.model.config import CM3Config  # noqa: E402
from cm3.model.decoder import CM3  # noqa: E402
from cm3.model.engine import ImageEngine, ImageSample, quantize_int8  # noqa: E402
from cm3.model.generation import image_prompt, unconditional_prompt  # noqa: E402
from cm3.model.sampling import SamplingConfig  # noqa: E402


def build_ours(config: CM3Config, device: torch.device, dtype: torch.dtype) -> CM3:
    model = CM3(config)
    with torch.no_grad():
        for weight in model.parameters():  # non-zero out-projections: a realistic (non-identity) network
            weight.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval()


def bandwidth(device: torch.device, megabytes: int = 1024) -> float:
    """Bytes/s of a device-to-device copy (read + write), the best of 5."""
    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        target.copy_(source)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * source.numel() * 4 / min(times[1:])


def bound_seconds(model: CM3, rows: int, prompt_len: int, tokens: int, image_codes: int, speed: float) -> float:
    """Seconds to read, at `speed` bytes/s, what each of the tokens - 1 decode steps must read: the blocks'
    weights, the image columns of the head, and the live KV cache of every row."""
    c = model.config
    item = model.tok_emb.weight.element_size()
    weights = sum(p.numel() for p in model.blocks.parameters()) * item + image_codes * c.d_model * item
    cache = model.new_kv_cache(1, 1)
    per_position = 2 * cache.keys[:, 0, :, 0].numel() * item * rows  # keys + values of every layer and head
    live = sum(prompt_len + t for t in range(1, tokens))
    return ((tokens - 1) * weights + live * per_position) / speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--images", type=int, nargs="+", default=[16], help="images per batch (CFG: 2x rows)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="image tokens per image (default: 64 for tiny, the demo's; 1024 otherwise)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per row, <eod> and <break> included")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="run the engine's step eagerly")
    parser.add_argument("--window", type=int, default=128, help="the engine's attention window bucket")
    parser.add_argument("--hf-max-images", type=int, default=16, help="run the HF peer only up to this batch")
    parser.add_argument("--int8", action="store_true", help="add the engine with int8 weight-only layers")
    parser.add_argument("--check", action="store_true",
                        help="also decode eagerly (no compile, no CUDA graphs) and count the codes that differ")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender after one warm-up")
    args = parser.parse_args()

    transformers, device, vocab = start_run(args)
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    tokens = args.tokens or (64 if args.preset == "tiny" else 1024)
    config = CM3Config.from_preset(args.preset, vocab_size=vocab.size)
    torch.manual_seed(0)
    ours = build_ours(config, device, dtype)
    quantized = quantize_int8(copy.deepcopy(ours)) if args.int8 else None
    hf = opt_peer(transformers, config, vocab, device, dtype).eval()
    caption = tuple(vocab.text_offset + i for i in range(args.prompt_len - 2))
    prompt = tuple(image_prompt(vocab, caption))
    sampling = SamplingConfig(guidance_scale=3.0, top_p=0.9, seed=0)
    speed = bandwidth(device)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"preset {args.preset} ({config.n_layers} layers, d {config.d_model}, vocab {vocab.size}), {name}, "
          f"{str(dtype).removeprefix('torch.')}, {tokens} tokens, prompt {args.prompt_len}, compile {args.compile}, "
          f"window {args.window}, copy bandwidth {speed / 1e9:.0f} GB/s, best of {args.repeats}")
    print(" | ".join(("contender", "images", "rows", "seconds", "images/s", "tokens/s", "x HF", "x bound",
                      "target met")))
    for images in args.images:
        samples = [ImageSample(prompt, sampling, i) for i in range(images)]

        def engine(model: CM3) -> ImageEngine:
            return ImageEngine(model, vocab, unconditional_prompt(vocab), tokens, images,
                               args.prompt_len + tokens - 1, compile=args.compile, window=args.window)

        main_engine = engine(ours)
        contenders = {"cm3 engine (CFG)": lambda: main_engine.generate(samples).cpu()}
        if quantized is not None:
            int8_engine = engine(quantized)
            contenders["cm3 engine int8 (CFG)"] = lambda: int8_engine.generate(samples).cpu()
        if images <= args.hf_max_images:
            input_ids = torch.randint(vocab.text_offset, vocab.image_offset, (2 * images, args.prompt_len),
                                      device=device)

            def run_hf():
                with torch.inference_mode():
                    hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                                min_new_tokens=tokens, do_sample=True, top_p=0.9, top_k=0, use_cache=True)

            contenders[f"HF transformers {transformers.__version__} OPT generate()"] = run_hf
        started = time.perf_counter()
        timings = best_seconds(contenders, args.repeats, device)
        bound = bound_seconds(ours, 2 * images, args.prompt_len, tokens, vocab.image_vocab_size, speed)
        peer = next((s for c, s in timings.items() if c.startswith("HF")), None)
        for contender, seconds in [*timings.items(), ("memory-bandwidth bound", bound)]:
            ratio = "-" if peer is None or contender.startswith("HF") else f"{peer / seconds:.2f}x"
            target = "-"
            if contender == "cm3 engine (CFG)":
                if cuda:
                    met = images / seconds >= (20 if images <= 16 else 25) and (peer is None or peer / seconds >= 15)
                else:
                    met = peer is not None and peer / seconds >= 3
                target = "yes" if met else "NO"
            print(" | ".join([contender, str(images), str(2 * images), f"{seconds:.3f}", f"{images / seconds:.2f}",
                              f"{2 * images * tokens / seconds:.0f}", ratio, f"{bound / seconds:.2f}", target]))
        codes = main_engine.generate(samples)
        if quantized is not None:
            same = (codes == int8_engine.generate(samples)).float().mean().item()
            print(f"int8 codes equal to {str(dtype).removeprefix('torch.')}'s under the same seed: {same:.1%}")
        if args.check:
            eager = ImageEngine(ours, vocab, unconditional_prompt(vocab), tokens, images, args.prompt_len + tokens - 1,
                                cuda_graphs=False).generate(samples)
            print(f"engine codes equal to the eager step's (no compile, no CUDA graphs): "
                  f"{(codes == eager).float().mean().item():.1%} ({(codes == eager).all(1).sum().item()} of "
                  f"{images} images identical)")
        print(f"({images} images: measured in {time.perf_counter() - started:.0f} s, compilation included)")


if __name__ == "__main__":
    main()
