"""Benchmark: VQ-GAN encode and decode images/s beside the CLIP image encoder, in one run.

The tokenize stage runs the VQ encoder (and later the CLIP image encoder) over every image, so
their throughputs side by side show which one bounds the stage. Weights are random (speed does
not depend on them). On a GPU: bf16 autocast and channels-last, as `VQGAN.encode` does there;
absolute images/s are only meaningful on a GPU (target: >= 1,000 images/s encode on one
H100/H200 for the 1024-token default); on a CPU read the ratio.

    .venv/bin/python benchmarks/tokenize.py                       # f8-8192 (1024 tokens), batch 64
    .venv/bin/python benchmarks/tokenize.py --preset demo --batches 5
    python3 benchmarks/tokenize.py --compile                      # on a GPU: eager and compiled
"""

from __future__ import annotations

import os
import sys

# This file is named like the standard library's `tokenize`, which torch imports: drop this folder
# from the import path before anything else is imported, or `import torch` would find this file.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from cm3.tokenizers.vqgan import VQGAN, VQGANConfig  # noqa: E402


def timed(fn, batches: int, device: str) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / batches


def clip_images_per_second(name: str, batch: int, batches: int, device: str) -> float:
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=None)
    model = model.to(device).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size, device=device)

    def run():
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            model.encode_image(images)

    return batch / timed(run, batches, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="f8-8192", help="VQ-GAN preset (f8-8192 = 1024 tokens per image)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=2, help="timed batches after one warm-up")
    parser.add_argument("--clip-model", default="ViT-B-32", help="OpenCLIP model name (random init)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time `for_inference(compile=True)`")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = VQGANConfig.preset(args.preset)
    images = torch.rand(args.batch_size, 3, config.resolution, config.resolution, device=args.device) * 2 - 1
    variants = {"eager": {}}
    if args.compile:
        variants["compiled"] = {"compile": True}
    rows = []
    for variant, options in variants.items():
        model = VQGAN(config)
        model = model.for_inference(args.device, **options)
        codes = model.encode(images, batch_size=args.batch_size)
        encode = args.batch_size / timed(lambda: model.encode(images, batch_size=args.batch_size), args.batches,
                                         args.device)
        decode = args.batch_size / timed(lambda: model.decode(codes, batch_size=args.batch_size), args.batches,
                                         args.device)
        rows += [(f"VQ encode ({args.preset}, {config.tokens_per_image} tokens), {variant}", encode),
                 (f"VQ decode ({args.preset}), {variant}", decode)]
        del model
    clip = clip_images_per_second(args.clip_model, args.batch_size, args.batches, args.device)
    rows.append((f"CLIP image encoder ({args.clip_model})", clip))
    encode = max(rate for name, rate in rows if name.startswith("VQ encode"))

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; batch {args.batch_size}; {args.batches} timed batches")
    print(f"{'stage':<60} {'images/s':>10} {'vs CLIP':>8}")
    for name, rate in rows:
        print(f"{name:<60} {rate:>10.1f} {rate / clip:>7.2f}x")
    if args.device == "cuda":
        print(f"GPU target (encode >= 1000 images/s): {'met' if encode >= 1000 else 'NOT met'} (best {encode:.0f})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"device": device, "preset": args.preset, "batch_size": args.batch_size,
                       "images_per_second": {name: rate for name, rate in rows}}, handle, indent=2)


if __name__ == "__main__":
    main()
