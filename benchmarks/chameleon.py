"""Benchmark: text -> image on a Chameleon-7B-shaped decoder (random weights) with Chameleon's guidance.

cm3 decodes `--images` images of `--tokens` image tokens each (1,024 for Chameleon) with Chameleon's three-stream
guidance (text scale 3.0, image scale 1.2: 3 x images rows over the static KV cache), temperature 0.7, top-p 0.9,
in bf16 on a GPU: it prints images/s and the peak GPU memory. The peer is transformers'
`ChameleonForConditionalGeneration` of the same shape generating the same number of new tokens for the same
rows with its own cache (greedy; it masks every image logit, so it writes text, and does no guidance math: the
work per step is the same forwards). The ratio compares the two at equal rows and steps. Weights are random:
speed does not depend on them, and a 7B-shaped model builds on the GPU in seconds with nothing to download.

    python benchmarks/chameleon.py --device cuda                       # 7B shape, bf16, 4 images x 1,024 tokens
    .venv/bin/python benchmarks/chameleon.py --shape tiny --tokens 16  # the same path on the CPU
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
from hf_peer import best_seconds, require_transformers  # noqa: E402

from cm3.model.chameleon import chameleon_config  # noqa: E402
from cm3.model.decoder import CM3  # noqa: E402
from cm3.model.generation import SamplingConfig, generate_image_tokens, image_prompt  # noqa: E402
from cm3.tokenizers.chameleon import ChameleonVocabulary  # noqa: E402

SHAPES = {  # Chameleon-7B's params.json; tiny runs the same code on a CPU
    "7b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden=11008, vocab_size=65536),
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden=176, vocab_size=1024),
}


def chameleon_vocabulary(size: int, codes: int) -> ChameleonVocabulary:
    """Chameleon's id layout: <s> <pad> </s> <unk>, the image tokens at 4.., its markers, then text."""
    names = ["<s>", "<pad>", "</s>", "<unk>"]
    names += ["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(c)) + "Z" for c in range(codes)]
    names += ["<eoss>", "<racm3:break>", "<reserved08706>"]
    names += [f"text{i}" for i in range(size - len(names))]
    return ChameleonVocabulary({name: i for i, name in enumerate(names)})


def build(shape: str, device: torch.device, dtype: torch.dtype) -> CM3:
    config = chameleon_config(**SHAPES[shape], norm_eps=1e-5, rope_theta=10_000.0, swin_norm=False, max_seq_len=4096)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = CM3(config)
            with torch.no_grad():
                for weight in model.parameters():  # non-zero out-projections: a realistic (non-identity) network
                    weight.normal_(0.0, 0.02)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def hf_peer(transformers, model: CM3, vocab: ChameleonVocabulary, device: torch.device, dtype: torch.dtype):
    c = model.config
    names = {vocab.token_name(i): i for i in range(vocab.size)}
    config = transformers.ChameleonConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.mlp_hidden, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads, max_position_embeddings=c.max_seq_len,
        vocabulary_map=names, pad_token_id=vocab.pad, bos_token_id=vocab.bos, eos_token_id=vocab.eos)
    with torch.device(device):
        peer = transformers.ChameleonForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                                          dtype=dtype)
    return peer.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024, help="image tokens per image (Chameleon: 1,024)")
    parser.add_argument("--prompt-len", type=int, default=32, help="caption tokens per prompt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per contender after one warm-up")
    parser.add_argument("--no-peer", action="store_true", help="time cm3 only")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    codes = 8192 if args.shape == "7b" else 64
    vocab = chameleon_vocabulary(SHAPES[args.shape]["vocab_size"], codes)
    model = build(args.shape, device, dtype)
    caption = vocab.text_mask().nonzero()[0][:args.prompt_len].tolist()
    prompts = [image_prompt(vocab, caption)] * args.images
    sampling = SamplingConfig(guidance_scale=3.0, image_guidance_scale=1.2, temperature=0.7, top_p=0.9, seed=0)
    rows = 3 * args.images

    def ours():
        ids = generate_image_tokens(model, vocab, prompts, args.tokens, sampling)
        assert ids.shape == (args.images, args.tokens) and bool(vocab.is_image(ids.cpu().numpy()).all())

    peak_gb = None
    if device.type == "cuda":  # cm3 alone: its memory, before the peer is loaded
        torch.cuda.reset_peak_memory_stats(device)
        ours()
        peak_gb = torch.cuda.max_memory_allocated(device) / 1e9
    contenders = {"cm3": ours}
    if not args.no_peer:
        peer = hf_peer(require_transformers(), model, vocab, device, dtype)
        input_ids = torch.tensor([prompts[0]] * rows, device=device)

        def theirs():
            peer.generate(input_ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                          pad_token_id=vocab.pad)

        contenders["transformers"] = theirs
    best = best_seconds(contenders, args.repeats, device)
    result = {"shape": args.shape, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
              "images": args.images, "tokens": args.tokens, "rows": rows,
              "cm3_images_per_s": args.images / best["cm3"]}
    print(f"{args.shape} ({dtype}, {device}): {args.images} images x {args.tokens} tokens, {rows} rows with "
          f"Chameleon's guidance: cm3 {best['cm3']:.2f} s, {result['cm3_images_per_s']:.3f} images/s")
    if "transformers" in best:
        result["transformers_images_per_s"] = args.images / best["transformers"]
        result["ratio"] = best["transformers"] / best["cm3"]
        print(f"transformers ChameleonForConditionalGeneration.generate, same rows and steps: "
              f"{best['transformers']:.2f} s; cm3 / transformers {result['ratio']:.2f}x")
    if peak_gb is not None:
        result["peak_gb"] = peak_gb
        print(f"cm3 peak GPU memory (weights, KV cache of {rows} rows, logits): {peak_gb:.1f} GB")
    return result


if __name__ == "__main__":
    main()
