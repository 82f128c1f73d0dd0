"""Benchmark: training tokens/s of cm3's `train_step` against Hugging Face `OPTForCausalLM`, in one run.

Ours is the step the training loop runs (`cm3.model.training.train_step`: forward, weighted CM3 loss split by
target kind, backward, gradient clipping, AdamW). The peer is `transformers.OPTForCausalLM` (sdpa attention) of
the same shape (layers, width, heads, 4x ReLU MLP, pre-LN, no biases, tied embeddings, vocab) trained on the same
batch with its own `labels` loss, the same clipping and the same AdamW. Both in fp32 on CPU, bf16 autocast on
CUDA. Weights and ids are random: speed does not depend on them.

Target: on the CPU, tiny preset, at least 1.0x HF. On a GPU it also prints MFU (6 N tokens/s over the peak).

    /tmp/hfvenv/bin/python benchmarks/train.py                         # tiny, CPU, 4 x 256 tokens
    python benchmarks/train.py --preset 350m --batch 8 --seq-len 2048 --device cuda --compile

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
from cm3.model.training import Batch, TokenKinds, build_optimizer, flops_per_token, peak_flops, train_step  # noqa: E402

CPU_TARGET = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, contenders taking turns; best round counts")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = parser.parse_args()

    transformers, device, vocab = start_run(args)
    config = CM3Config.from_preset(args.preset, vocab_size=vocab.size, max_seq_len=max(args.seq_len + 1, 8))
    autocast = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)

    ours = CM3(config).to(device)
    peer = opt_peer(transformers, config, vocab, device).train()
    ours_forward = torch.compile(ours) if args.compile else ours
    peer_forward = torch.compile(peer) if args.compile else peer
    ours_optimizer, peer_optimizer = build_optimizer(ours, config), build_optimizer(peer, config)
    kinds = TokenKinds(vocab)
    ids = torch.randint(vocab.text_offset, vocab.size, (args.batch, args.seq_len + 1), device=device)
    batch = Batch(ids[:, :-1], ids[:, 1:], torch.ones(args.batch, args.seq_len, device=device))

    def ours_steps() -> None:
        for _ in range(args.steps):
            train_step(ours_forward, ours_optimizer, [batch], config.lr, config.grad_clip, kinds, autocast)

    def peer_steps() -> None:
        for _ in range(args.steps):
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = peer_forward(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(peer.parameters(), config.grad_clip)
            peer_optimizer.step()
            peer_optimizer.zero_grad(set_to_none=True)

    best = best_seconds({"cm3 train_step": ours_steps, "HF OPTForCausalLM": peer_steps}, args.rounds, device)

    tokens = args.steps * args.batch * args.seq_len
    rates = {name: tokens / s for name, s in best.items()}
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.preset} preset ({config.n_layers} layers, d {config.d_model}, vocab {config.vocab_size}), "
          f"batch {args.batch} x {args.seq_len}, {device.type} ({name}), "
          f"{'bf16 autocast' if autocast else 'fp32'}{', compiled' if args.compile else ''}, best of {args.rounds}")
    print(f"{'contender':<20} {'tokens/s':>12} {'ms/step':>10} {'MFU':>8}")
    for contender, rate in rates.items():
        mfu = f"{flops_per_token(config, args.seq_len) * rate / peak:.1%}" if peak else "-"
        print(f"{contender:<20} {rate:>12,.0f} {1000 * best[contender] / args.steps:>10.1f} {mfu:>8}")
    ratio = rates["cm3 train_step"] / rates["HF OPTForCausalLM"]
    target = f"target >= {CPU_TARGET:.1f}x: {'met' if ratio >= CPU_TARGET else 'NOT met'}" \
        if device.type == "cpu" else "no GPU ratio target"
    print(f"ratio cm3 / HF: {ratio:.2f}x ({target})")


if __name__ == "__main__":
    main()
