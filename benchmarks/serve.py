"""Benchmark: `cm3 serve` under a bounded load over loopback against the decode engine called directly with the
same batch, in one run.

A random checkpoint of `--preset` (the demo VQ-GAN, 64 tokens per image, for tiny; the paper's f8-8192, 1,024
tokens, otherwise) is written to a temp folder. First the engine alone: `--batches` calls of
`--max-batch-images` images each, in this process on `--threads` threads (images/s of the codes, compilation
excluded; and of the codes decoded to pixels, for reference). Then `cm3 serve` in its own process with its own
Ray and one replica on as many threads, and at each concurrency (1, 8, 32) that many clients each send
`--requests` requests of one image (n=1), one after the other: p50/p99 latency and images/s (PNGs received).
The ratio is served images/s at the highest concurrency over the engine's.

Target: at concurrency 32, >= 0.8x the engine's offline throughput at the same batch; p99 reported.

    .venv/bin/python benchmarks/serve.py                                   # tiny, CPU
    python benchmarks/serve.py --preset 350m --max-batch-images 32         # GPU
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]  # see generate.py

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from cm3.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from cm3.model.config import CM3Config  # noqa: E402
from cm3.model.decoder import CM3  # noqa: E402
from cm3.model.engine import ImageEngine, ImageSample  # noqa: E402
from cm3.model.generation import image_prompt, unconditional_prompt  # noqa: E402
from cm3.model.sampling import SamplingConfig  # noqa: E402
from cm3.tokenizers.multimodal import MultimodalTokenizer  # noqa: E402
from cm3.tokenizers.text import TextTokenizer  # noqa: E402
from cm3.tokenizers.vqgan import VQGAN, VQGANConfig  # noqa: E402
from cm3.workflows.ray_cluster import free_port  # noqa: E402

PROMPT = "a small red circle at the top left on a white background"


def write_checkpoint(folder: Path, preset: str) -> Path:
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig.preset("demo" if preset == "tiny" else "f8-8192")).eval()
    words = [f"a {s} {c} {k} at the {p} on a {b} background" for s in ("small", "large")
             for c in ("red", "green", "blue") for k in ("circle", "square") for p in ("top left", "centre")
             for b in ("white", "black")]
    tokenizer = MultimodalTokenizer(TextTokenizer.train(words * 4, vocab_size=300), vq)
    config = CM3Config.from_preset(preset, vocab_size=tokenizer.vocab.size,
                                   max_seq_len=max(512, 2 * tokenizer.tokens_per_image))
    model = CM3(config)
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0.0, 0.02)
    return save_checkpoint(folder / "ckpt", model, tokenizer)


def engine_images_per_second(checkpoint: Path, device: str, batch: int, batches: int,
                             compile: bool) -> tuple[float, float]:
    """Images/s of the engine's codes, and of the codes decoded to pixels by the VQ-GAN (what the server adds
    before PNG encoding)."""
    dtype = torch.bfloat16 if device.startswith("cuda") else None
    model, tokenizer = load_checkpoint(checkpoint, device=device, dtype=dtype)
    vocab = tokenizer.vocab
    engine = ImageEngine(model, vocab, unconditional_prompt(vocab), tokenizer.tokens_per_image, batch,
                         compile=compile)
    prompt = tuple(image_prompt(vocab, tokenizer.encode_caption(PROMPT)))
    samples = [ImageSample(prompt, SamplingConfig(seed=0), i) for i in range(batch)]
    tokenizer.decode_image(engine.generate(samples).cpu())  # compilation, CUDA graph capture
    codes_s = pixels_s = 0.0
    for _ in range(batches):
        started = time.perf_counter()
        ids = engine.generate(samples).cpu()
        decoded = time.perf_counter()
        tokenizer.decode_image(ids).cpu()
        codes_s += decoded - started
        pixels_s += time.perf_counter() - decoded
    return batch * batches / codes_s, batch * batches / (codes_s + pixels_s)


def post(url: str, body: dict) -> tuple[float, int, int]:
    """(seconds, HTTP status, images received)."""
    started = time.perf_counter()
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=900) as response:
            images = len(json.loads(response.read())["images"])
            return time.perf_counter() - started, response.status, images
    except urllib.error.HTTPError as err:
        return time.perf_counter() - started, err.code, 0


def wait_for_health(url: str, proc: subprocess.Popen, deadline_s: float) -> None:
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"cm3 serve exited {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    sys.exit(f"{url}/health did not answer within {deadline_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-batch-images", type=int, default=16)
    parser.add_argument("--batches", type=int, default=3, help="engine calls timed after one warm-up")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=4, help="requests per client at each concurrency")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU: torch threads of the engine here and of the server's replica (--cpus-per-replica)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the decode step (default: on CUDA only, as cm3 serve does)")
    args = parser.parse_args()
    compile = args.device.startswith("cuda") if args.compile is None else args.compile
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="cm3-serve-bench-") as tmp:
        checkpoint = write_checkpoint(Path(tmp), args.preset)
        offline, offline_pixels = engine_images_per_second(checkpoint, args.device, args.max_batch_images,
                                                           args.batches, compile)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "cm3.workflows.cli", "serve", str(checkpoint), "--port", str(port),
                   "--device", args.device, "--max-batch-images", str(args.max_batch_images),
                   "--compile" if compile else "--no-compile", "--max-queued", str(4 * max(args.concurrency)),
                   "--cpus-per-replica", str(args.threads)]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        server = subprocess.Popen(command, env=env)
        try:
            wait_for_health(url, server, deadline_s=900)
            print(f"preset {args.preset}, {args.device}, batch {args.max_batch_images} images, compile {compile}, "
                  f"{args.threads} threads")
            print(" | ".join(("contender", "concurrency", "requests", "p50 s", "p99 s", "images/s", "x engine")))
            print(" | ".join(("engine, called directly", "-", str(args.batches), "-", "-", f"{offline:.2f}", "1.00")))
            print(" | ".join(("engine + VQ decode to pixels", "-", str(args.batches), "-", "-",
                              f"{offline_pixels:.2f}", f"{offline_pixels / offline:.2f}")))
            served = 0.0
            for clients in args.concurrency:
                bodies = [{"prompt": PROMPT, "n": 1, "seed": i} for i in range(clients * args.requests)]
                post(f"{url}/generate", bodies[0])  # the server is warm; this only opens the path
                started = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    results = list(pool.map(lambda body: post(f"{url}/generate", body), bodies))
                wall = time.perf_counter() - started
                failed = [status for _, status, _ in results if status != 200]
                latencies = sorted(seconds for seconds, _, _ in results)
                served = sum(images for _, _, images in results) / wall
                p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else latencies[0]
                print(" | ".join(("cm3 serve over HTTP", str(clients), str(len(bodies)),
                                  f"{statistics.median(latencies):.3f}", f"{p99:.3f}", f"{served:.2f}",
                                  f"{served / offline:.2f}" + (f" ({len(failed)} failed: {failed[:3]})" if failed
                                                               else ""))))
            verdict = "yes" if served / offline >= 0.8 else "NO"
            print(f"target >= 0.8x the engine at concurrency {args.concurrency[-1]}: {served / offline:.2f}x "
                  f"-> {verdict}")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)


if __name__ == "__main__":
    main()
