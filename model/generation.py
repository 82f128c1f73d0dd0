"""Decoding for CM3Leon, the entry points: text-to-image with classifier-free guidance and contrastive decoding
(CD-K) by the decode engine (`model/engine.py`), and text (captions, VQA answers) over the decoder's KV cache.
The rules that pick a token live in `model/sampling.py`.

Layouts (the paper's, in cm3's vocabulary; `cm3.tokenizers.layout` builds them):

    text -> image   <eod> [retrieved doc <break>]* caption <break>  -> tokens_per_image image ids, then <break>
    unconditional   <eod> <mask:0> <break>                          (the CFG / CD-K amateur stream)
    image -> text   <eod> IMG <break> [question]                    -> text ids until <eod>

A converted Chameleon checkpoint's vocabulary (`ChameleonVocabulary`) lays the same prompts out with its own
tokens: `<s> [text <racm3:break> IMG <eoss>]* caption <racm3:break>`, unconditional `<s> <racm3:break>`, and
exactly tokens_per_image image ids are generated before `<eoss>`. Only the vocabulary's layout names are used
(`bos`, `begin_image`, `join`, ...), never cm3's id ranges.

Guidance runs the conditional and unconditional streams as one batch of 2B rows (cond rows first), each row with
its own KV-cache row, so every step is one forward pass; with `image_guidance_scale`, Chameleon's three streams
(InstructPix2Pix's guidance: full prompt, the prompt's images alone, unconditional). Row i of a call is sample i
of the config's seed.

Padding: prompts of different lengths (the 3-token unconditional prompt always is shorter) are LEFT-padded with
<pad>, and the decoder's `key_padding` hides the pads from attention, so every row attends only to its own
prompt. Learned positions shift by the pad count; training packs documents at every offset of a window, so the
model does not rely on a document starting at position 0.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from numpy.typing import ArrayLike

from cm3.model.decoder import CM3
from cm3.model.engine import ImageEngine, ImageSample, check_vocab, left_pad, pad_mask
from cm3.model.sampling import ROW_METHODS, restrict_to, sample, top_p_filter, uniform_draws
from cm3.model.sampling_options import CAPTION_METHOD, CAPTION_TOKENS, SamplingConfig
from cm3.tokenizers.layout import (  # noqa: F401  (the prompts, re-exported for generation's callers)
    caption_prompt, image_only_prompt, image_prompt, unconditional_prompt)
from cm3.tokenizers.multimodal import MultimodalTokenizer
from cm3.tokenizers.vocabulary import Vocabulary


def check_room(model: CM3, prompt_len: int, new_tokens: int) -> None:
    limit = model.config.max_seq_len
    if prompt_len + new_tokens > limit:
        raise ValueError(f"a prompt of {prompt_len} tokens plus {new_tokens} to generate exceeds the model's "
                         f"max_seq_len {limit}: shorten the prompt (or use fewer retrieved documents)")


def seeded(sampling: SamplingConfig) -> SamplingConfig:
    """The config itself, or a copy with a fresh random seed when it has none (so the rows can be replayed)."""
    if sampling.seed is not None:
        return sampling
    return replace(sampling, seed=secrets.randbits(32))


# --- decoding loops -------------------------------------------------------------------------------------------


def generate_image_tokens(model: CM3, vocab: Vocabulary, prompts: Sequence[Sequence[int]], tokens_per_image: int,
                          sampling: SamplingConfig, methods_per_row: Sequence[str] | None = None,
                          engine: ImageEngine | None = None) -> torch.Tensor:
    """Joint image ids [B, tokens_per_image], one image per prompt (each ending with the vocabulary's
    begin_image: <break>, or Chameleon's <racm3:break>), by the decode engine (`model/engine.py`): row i is
    sample i of sampling.seed; `methods_per_row` mixes top-p and CD-K.

    Only the image ids' logits are used, so every sampled id is an image id and there are exactly
    tokens_per_image of them; the closing end_image is forced, not sampled, so it is not returned. `engine` (one built for this model, rows and tokens, e.g.
    compiled) is used when given; otherwise an eager one is built for this call.
    """
    check_vocab(model, vocab)
    if not prompts or tokens_per_image < 1:
        raise ValueError(f"need prompts and tokens_per_image >= 1, got {len(prompts)} and {tokens_per_image}")
    if methods_per_row is not None and (len(methods_per_row) != len(prompts)
                                        or any(m not in ROW_METHODS for m in methods_per_row)):
        raise ValueError(f"methods_per_row needs one of {ROW_METHODS} per prompt ({len(prompts)}), "
                         f"got {methods_per_row}")
    if any(not p or p[-1] != vocab.begin_image for p in prompts):
        raise ValueError(f"every text-to-image prompt must end with the begin-image token "
                                 f"{vocab.token_name(vocab.begin_image)} (see image_prompt)")
    uncond = unconditional_prompt(vocab)
    prompt_len = max(len(p) for p in [*prompts, uncond])
    check_room(model, prompt_len, tokens_per_image + 1)  # + the closing end_image
    sampling = seeded(sampling)
    samples = [ImageSample(tuple(p), sampling, i, None if methods_per_row is None else methods_per_row[i])
               for i, p in enumerate(prompts)]
    if engine is None:
        engine = ImageEngine(model, vocab, uncond, tokens_per_image, len(prompts), prompt_len + tokens_per_image - 1,
                             cd_k=sampling.cd_k, image_guidance=sampling.image_guidance_scale is not None)
    elif engine.tokens != tokens_per_image:
        raise ValueError(f"the engine samples {engine.tokens} tokens per image, not {tokens_per_image}")
    return torch.cat([engine.generate(samples[i:i + engine.rows]) for i in range(0, len(samples), engine.rows)])


@torch.inference_mode()
def generate_text(model: CM3, vocab: Vocabulary, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  sampling: SamplingConfig, stop_ids: Sequence[int] | None = None) -> list[list[int]]:
    """New text ids per prompt (the stop id not included), restricted to text ids + stop_ids (default: the
    vocabulary's `stop_ids`); a row stops at its first stop id, the batch when every row has stopped or after
    max_new_tokens. No guidance: greedy or top-p (row i draws sample i of sampling.seed, as images do)."""
    stop_ids = vocab.stop_ids if stop_ids is None else stop_ids
    check_vocab(model, vocab)
    if sampling.method not in ("greedy", "top_p"):
        raise ValueError(f"text generation samples greedy or top_p, got {sampling.method!r}")
    if not prompts or any(not p for p in prompts) or max_new_tokens < 1:
        raise ValueError("need non-empty prompts and max_new_tokens >= 1")
    device = model.tok_emb.weight.device
    sampling = seeded(sampling)
    ids = left_pad(prompts, vocab.pad, device)
    B, prompt_len = ids.shape
    check_room(model, prompt_len, max_new_tokens)
    allowed = torch.from_numpy(vocab.text_mask()).to(device)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    allowed[stops] = True
    seeds = torch.full((B,), sampling.seed, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)

    cache = model.new_kv_cache(B, prompt_len + max_new_tokens)
    padding = pad_mask(prompts, device)
    if padding is not None:
        padding = torch.cat([padding, padding.new_zeros(B, max_new_tokens)], dim=1)
    upto = lambda length: None if padding is None else padding[:, :length]  # noqa: E731
    logits = model(ids, kv_cache=cache, key_padding=upto(prompt_len))[:, -1]
    out = torch.full((B, max_new_tokens), vocab.pad, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps = 0
    for i in range(max_new_tokens):
        logits = restrict_to(logits, allowed)
        if sampling.method == "greedy":
            token = sample(logits, None)
        else:
            token = sample(top_p_filter(logits / sampling.temperature, sampling.top_p),
                           uniform_draws(seeds, rows, i))
        token = token.masked_fill(done, vocab.pad)
        out[:, i] = token
        steps = i + 1
        done |= torch.isin(token, stops)
        if bool(done.all()) or steps == max_new_tokens:
            break
        logits = model(token[:, None], kv_cache=cache, start_pos=prompt_len + i,
                       key_padding=upto(prompt_len + i + 1))[:, -1]
    return [_until_stop(row, set(stop_ids)) for row in out[:, :steps].tolist()]


def _until_stop(row: list[int], stops: set[int]) -> list[int]:
    return next((row[:i] for i, t in enumerate(row) if t in stops), row)


# --- tokenizer-level entry points -----------------------------------------------------------------------------


def text_to_image(model: CM3, tokenizer: MultimodalTokenizer, prompt: str, n: int,
                  sampling: SamplingConfig | None = None,
                  retrieved: Sequence[tuple[str, ArrayLike | torch.Tensor]] | None = None,
                  mix: bool = False, engine: ImageEngine | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n images for one caption -> (images float [n, 3, H, W] in [-1, 1], image ids [n, tokens_per_image]).

    `retrieved` are (caption, VQ codes) documents prepended as `text <break> IMG <break>` (in the tokenizer's
    vocabulary: Chameleon's wraps each image in its own markers instead); `mix` samples the
    first half of the rows with top-p and the rest with CD-K (the paper's best FID recipe, before CLIP re-ranking).
    The prompt is prefilled once for the n rows; `engine` as in `generate_image_tokens`.
    """
    sampling = sampling or SamplingConfig()
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ids = text_to_image_prompt(tokenizer, prompt, retrieved or ())
    methods = ["top_p"] * (n - n // 2) + ["cd_k"] * (n // 2) if mix else None
    image_ids = generate_image_tokens(model, tokenizer.vocab, [ids] * n, tokenizer.tokens_per_image, sampling,
                                      methods, engine)
    return tokenizer.decode_image(image_ids), image_ids


def text_to_image_prompt(tokenizer: MultimodalTokenizer, prompt: str,
                         retrieved: Sequence[tuple[str, ArrayLike | torch.Tensor]] = ()) -> list[int]:
    """The text-to-image prompt (joint ids) for a caption and (caption, VQ codes) retrieved documents, in the
    tokenizer's vocabulary (`image_prompt`)."""
    docs = []
    for caption, codes in retrieved:
        codes = np.asarray(_codes(codes)).reshape(-1)
        if codes.size != tokenizer.tokens_per_image:
            raise ValueError(f"a retrieved image has {codes.size} codes but this tokenizer's images have "
                             f"{tokenizer.tokens_per_image}: build the index with the checkpoint's tokenizer")
        docs.append((tokenizer.encode_caption(caption), tokenizer.vocab.image_ids(codes).tolist()))
    return image_prompt(tokenizer.vocab, tokenizer.encode_caption(prompt), docs)


def caption_image(model: CM3, tokenizer: MultimodalTokenizer, images: torch.Tensor, question: str | None = None,
                  sampling: SamplingConfig | None = None, max_new_tokens: int = CAPTION_TOKENS) -> list[str]:
    """Captions (or, given a question, VQA answers) for images float [B, 3, H, W] in [-1, 1]:
    `<eod> IMG <break> [question]` then text until <eod>."""
    sampling = sampling or SamplingConfig(method=CAPTION_METHOD)
    vocab = tokenizer.vocab
    image_ids = tokenizer.encode_image(images).tolist()
    tail = tokenizer.encode_caption(question) if question else []
    prompts = [caption_prompt(vocab, row, tail) for row in image_ids]
    answers = generate_text(model, vocab, prompts, max_new_tokens, sampling)
    return [tokenizer.decode_text(ids) for ids in answers]


def _codes(codes: ArrayLike | torch.Tensor):
    return codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else codes


def rerank_by_clip(images: torch.Tensor, prompt: str,
                   clip_score_fn: Callable[[torch.Tensor, str], torch.Tensor]) -> torch.Tensor:
    """Indices of images [n, 3, H, W] from best to worst CLIP score against prompt (the paper's FID re-ranking);
    clip_score_fn(images, text) -> scores [n]."""
    scores = torch.as_tensor(clip_score_fn(images, prompt)).flatten()
    if scores.numel() != images.shape[0]:
        raise ValueError(f"clip_score_fn returned {scores.numel()} scores for {images.shape[0]} images")
    return scores.argsort(descending=True, stable=True)
