"""Benchmark: cm3's training step against Hugging Face `OPTForCausalLM` of the same shape, MFU by both formulas,
and the share of a step that the worker waits for data.

Step: ours is the step the training loop runs (`cm3.model.train_step.train_step`: forward with the chunked loss,
weighted CM3 loss split by target kind, backward, gradient clipping, AdamW), compiled per block with --compile as
`cm3 train --compile` does. The peer is `transformers.OPTForCausalLM` (sdpa attention) of the same shape (layers,
width, heads, 4x ReLU MLP, pre-LN, no biases, tied embeddings, vocab) on the same batch with its own `labels`
loss, the same clipping and AdamW, compiled whole with --compile. fp32 on CPU, bf16 autocast on CUDA; random
weights and ids (speed does not depend on them). MFU is printed by PaLM's/torchtitan's count (6 N + 12 L T d per
token) and by the 6 L T d attention term cm3 used before, for one release while users switch.

Data wait: cm3's data path (rank-sharded Parquet reads, numpy columns, CM3 transform and packing in the
background producer) feeding the same step from synthetic retrieval-augmented shards; the share of each step
spent waiting for the next batch. `--workers 1 2 4` instead measures it in real `cm3 train` runs on a local Ray
cluster of this machine's CPUs (tiny preset), one run per worker count.

    /tmp/hfvenv/bin/python benchmarks/train.py                                   # tiny, CPU, 4 x 256 tokens
    python benchmarks/train.py --preset 350m --batch 8 --seq-len 4096 --device cuda --compile
    .venv/bin/python benchmarks/train.py --workers 1 2 4                         # data wait of Ray workers

Targets: on a GPU (350m, 4096, bf16) >= 50% MFU by PaLM's count and >= 1.5x HF; on the CPU, tiny preset,
>= 1.0x HF; data wait <= 5% of the step at 4 CPU workers. transformers must be importable for the step
comparison (it is not a cm3 dependency): see `hf_peer.require_transformers`.
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the standard library's `tokenize` (which torch imports) while this folder is
# first on the import path, as it is for a script run from here: move it last, where `hf_peer` is still found.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from hf_peer import add_run_arguments, best_seconds, opt_peer, start_run  # noqa: E402

from cm3.model.config import CM3Config  # noqa: E402
from cm3.model.decoder import CM3  # noqa: E402
from cm3.model.parallelize import ParallelOptions, parallelize  # noqa: E402
from cm3.model.sequences import SequenceConfig  # noqa: E402
from cm3.model.train_data import Batch, BatchProducer, RankShards, packed_windows, shard_units  # noqa: E402
from cm3.model.train_metrics import LEGACY_ATTENTION_FLOPS, flops_per_token, peak_flops  # noqa: E402
from cm3.model.train_step import TokenKinds, build_optimizer, train_step  # noqa: E402
from cm3.tokenizers.vocabulary import Vocabulary  # noqa: E402

CPU_TARGET, GPU_TARGET, GPU_MFU_TARGET, DATA_WAIT_TARGET = 1.0, 1.5, 0.50, 0.05
COLUMNS = ["text_ids", "image_ids", "neighbour_text_ids", "neighbour_image_ids"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, contenders taking turns; best round counts")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--data-steps", type=int, default=20, help="steps of the data-wait measurement")
    parser.add_argument("--workers", type=int, nargs="*", help="measure data wait in cm3 train runs instead")
    args = parser.parse_args()
    if args.workers:
        ray_data_wait(args.workers, args.data_steps)
        return

    transformers, device, vocab = start_run(args)
    config = CM3Config.from_preset(args.preset, vocab_size=vocab.size, max_seq_len=max(args.seq_len + 1, 8))
    autocast = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)

    ours = parallelize(CM3(config).to(device), device, 1, ParallelOptions("none", compile=args.compile))
    peer = opt_peer(transformers, config, vocab, device).train()
    peer_forward = torch.compile(peer) if args.compile else peer
    ours_optimizer, peer_optimizer = build_optimizer(ours.model, config), build_optimizer(peer, config)
    kinds = TokenKinds(vocab)
    ids = torch.randint(vocab.text_offset, vocab.size, (args.batch, args.seq_len + 1), device=device)
    batch = Batch(ids[:, :-1], ids[:, 1:], torch.ones(args.batch, args.seq_len, device=device))

    def ours_steps() -> None:
        for _ in range(args.steps):
            train_step(ours.forward, ours_optimizer, [batch], config.lr, config.grad_clip, kinds, autocast)

    def peer_steps() -> None:
        for _ in range(args.steps):
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = peer_forward(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(peer.parameters(), config.grad_clip)
            peer_optimizer.step()
            peer_optimizer.zero_grad(set_to_none=True)

    best = best_seconds({"cm3 train_step": ours_steps, "HF OPTForCausalLM": peer_steps}, args.rounds, device)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device) / 2**30

    tokens = args.steps * args.batch * args.seq_len
    rates = {name: tokens / s for name, s in best.items()}
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.preset} preset ({config.n_layers} layers, d {config.d_model}, vocab {config.vocab_size}), "
          f"batch {args.batch} x {args.seq_len}, {device.type} ({name}), "
          f"{'bf16 autocast' if autocast else 'fp32'}{', compiled' if args.compile else ''}, best of {args.rounds}")
    print(f"{'contender':<20} {'tokens/s':>12} {'ms/step':>10} {'MFU 6N+12LTd':>13} {'MFU 6N+6LTd':>12}")
    for contender, rate in rates.items():
        mfu = [f"{flops_per_token(config, args.seq_len, a) * rate / peak:.1%}" if peak else "-"
               for a in (12, LEGACY_ATTENTION_FLOPS)]
        print(f"{contender:<20} {rate:>12,.0f} {1000 * best[contender] / args.steps:>10.1f} {mfu[0]:>13} {mfu[1]:>12}")
    if device.type == "cuda":
        print(f"peak GPU memory (both contenders): {memory:.1f} GiB")
    ratio = rates["cm3 train_step"] / rates["HF OPTForCausalLM"]
    target = GPU_TARGET if device.type == "cuda" else CPU_TARGET
    print(f"ratio cm3 / HF: {ratio:.2f}x (target >= {target:.1f}x: {'met' if ratio >= target else 'NOT met'})")
    if device.type == "cuda" and peak:
        mfu = flops_per_token(config, args.seq_len) * rates["cm3 train_step"] / peak
        print(f"cm3 MFU {mfu:.1%} (target >= {GPU_MFU_TARGET:.0%}: {'met' if mfu >= GPU_MFU_TARGET else 'NOT met'})")

    del peer, peer_forward, peer_optimizer
    with tempfile.TemporaryDirectory() as folder:
        paths = write_shards(Path(folder), vocab, image_tokens=64 if args.preset == "tiny" else 1024,
                             rows=max(64, args.batch * args.data_steps * 2), shards=4)
        waits = loop_data_wait(ours, ours_optimizer, config, vocab, paths, args.batch, args.seq_len, args.data_steps,
                               device, autocast)
    print(f"data wait (cm3's data path feeding this step, {args.data_steps} steps): median {statistics.median(waits):.1%}, "
          f"mean {statistics.mean(waits):.1%} of the step; first step {waits[0]:.1%}")


def loop_data_wait(ours, optimizer, config: CM3Config, vocab: Vocabulary, paths: list[str], batch: int, seq_len: int,
                   steps: int, device: torch.device, autocast) -> list[float]:
    """Per step, the share of the step spent waiting for the background producer (as in `train_loop`)."""
    sequences = SequenceConfig(seq_len=seq_len)
    windows = packed_windows(RankShards(shard_units(paths, 1), COLUMNS, seed=0), vocab, sequences)
    producer = BatchProducer(windows, batch, 1, pin=device.type == "cuda")
    kinds, waits = TokenKinds(vocab), []
    try:
        for _ in range(steps):
            started = time.perf_counter()
            data = producer.next(device)
            train_step(ours.forward, optimizer, data.micro_batches, config.lr, config.grad_clip, kinds, autocast)
            waits.append(data.wait_seconds / (time.perf_counter() - started))
    finally:
        producer.close()
    return waits


def write_shards(folder: Path, vocab: Vocabulary, image_tokens: int, rows: int, shards: int) -> list[str]:
    """Retrieval-augmented shards of random ids: captions of 8-24 BPE ids, one image each, two neighbours."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        text = [rng.integers(0, vocab.text_vocab_size, int(rng.integers(8, 25))).tolist() for _ in range(rows)]
        image = rng.integers(0, vocab.image_vocab_size, (rows, image_tokens)).tolist()
        table = pa.table({"text_ids": text, "image_ids": image,
                          "neighbour_text_ids": [[t, t] for t in text], "neighbour_image_ids": [[i, i] for i in image]})
        paths.append(str(folder / f"{shard:05d}.parquet"))
        pq.write_table(table, paths[-1])
    return paths


def ray_data_wait(workers: list[int], steps: int) -> None:
    """`cm3 train` with the tiny preset on a local Ray cluster of this machine's CPUs, once per worker count:
    the median and mean data-wait share (steps after the first) from each run's metrics."""
    import ray

    from cm3.model.train_metrics import read_metrics
    from cm3.tokenizers.multimodal import MultimodalTokenizer
    from cm3.tokenizers.text import TextTokenizer
    from cm3.tokenizers.vqgan import VQGAN, VQGANConfig
    from cm3.workflows.ray_session import connect
    from cm3.workflows.train import TrainOptions, run_training

    cpus = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        words = ["".join(np.random.default_rng(i).choice(list("abcdefghijklmnopqrstuvwxyz"), 6)) for i in range(20000)]
        text = TextTokenizer.train([" ".join(words[i:i + 20]) for i in range(0, len(words), 20)] * 3, vocab_size=8192)
        vq = VQGAN(VQGANConfig(ch=8, ch_mult=(1, 2, 2, 2), z_channels=8, embed_dim=8, n_embed=512, resolution=64,
                               norm_groups=8, num_res_blocks=1, attn_resolutions=()))
        tokenizer = MultimodalTokenizer(text, vq)
        tokenizer.save(root / "tokenizer")
        write_shards(root / "shards", tokenizer.vocab, image_tokens=64, rows=1000, shards=8)
        connect(None, num_cpus=cpus, quiet=True)
        for n in workers:
            options = TrainOptions(stage="pretrain", shards=root / "shards", tokenizer=root / "tokenizer",
                                   storage=root / "runs", name=f"workers{n}", preset="tiny", steps=steps,
                                   num_workers=n, cpus_per_worker=cpus / n, threads_per_worker=max(1, cpus // n),
                                   checkpoint_every=steps, log_every=steps, max_failures=0)
            started = time.time()
            result = run_training(options)
            records = read_metrics(result.metrics)[1:]
            rows.append((n, statistics.median(r["data_wait"] for r in records),
                         statistics.mean(r["data_wait"] for r in records),
                         statistics.median(r["tokens_per_s"] for r in records), time.time() - started))
        ray.shutdown()
    print(f"\ntiny preset (vocab {tokenizer.vocab.size}, batch 8 x 512 per worker), {cpus} CPUs, steps 2-{steps}")
    print(f"{'workers':>7} {'data wait median':>17} {'mean':>8} {'tokens/s':>10} {'run s':>7}")
    for n, median, mean, rate, seconds in rows:
        print(f"{n:>7} {median:>17.2%} {mean:>8.2%} {rate:>10,.0f} {seconds:>7.0f}")
    at_most = max(mean for n, _, mean, _, _ in rows if n == max(workers))
    print(f"data wait at {max(workers)} workers: {at_most:.2%} of the step (target <= {DATA_WAIT_TARGET:.0%}: "
          f"{'met' if at_most <= DATA_WAIT_TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
