"""Decoding for CM3Leon: text-to-image with classifier-free guidance and contrastive decoding (CD-K), and text
(captions, VQA answers), over the decoder's static KV cache.

Layouts (the paper's, in cm3's vocabulary):

    text -> image   <eod> [retrieved doc <break>]* caption <break>  -> tokens_per_image image ids, then <break>
    unconditional   <eod> <mask:0> <break>                          (the CFG / CD-K amateur stream)
    image -> text   <eod> IMG <break> [question]                    -> text ids until <eod>

A converted Chameleon checkpoint's vocabulary (`ChameleonVocabulary`) lays the same prompts out with its own
tokens: `<s> [text <racm3:break> IMG <eoss>]* caption <racm3:break>`, unconditional `<s> <racm3:break>`, and
exactly tokens_per_image image ids are generated before `<eoss>`. Only the vocabulary's layout names are used
(`bos`, `begin_image`, `join`, ...), never cm3's id ranges.

Guidance runs the conditional and unconditional streams as one batch of 2B rows (cond rows first), each row with
its own KV-cache row, so every step is one forward pass. With `image_guidance_scale` it runs Chameleon's three
streams (InstructPix2Pix's guidance): full prompt, the prompt's images alone, and unconditional.

Padding: prompts of different lengths (the 3-token unconditional prompt always is shorter) are LEFT-padded with
<pad>, and the decoder's `key_padding` hides the pads from attention, so every row attends only to its own
prompt. Learned positions shift by the pad count; training packs documents at every offset of a window, so the
model does not rely on a document starting at position 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike

from cm3.model.decoder import CM3
from cm3.model.sampling_options import CAPTION_METHOD, CAPTION_TOKENS, SamplingConfig
from cm3.tokenizers.layout import caption_prompt, image_only_prompt, image_prompt, unconditional_prompt
from cm3.tokenizers.multimodal import MultimodalTokenizer
from cm3.tokenizers.vocabulary import Vocabulary

ROW_METHODS = ("top_p", "cd_k")  # what a per-row mix may hold (the paper's FID recipe mixes these two)


# --- pure functions on logits --------------------------------------------------------------------------------


def apply_guidance(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG: uncond + scale * (cond - uncond), written as cond + (scale - 1) * (cond - uncond) so that scale 1
    returns the conditional logits bit for bit."""
    return cond_logits + (scale - 1.0) * (cond_logits - uncond_logits)


def apply_image_text_guidance(full: torch.Tensor, image_only: torch.Tensor, uncond: torch.Tensor,
                              text_scale: float, image_scale: float) -> torch.Tensor:
    """Chameleon's CFG (InstructPix2Pix's): uncond + image_scale * (image_only - uncond)
    + text_scale * (full - image_only)."""
    return uncond + image_scale * (image_only - uncond) + text_scale * (full - image_only)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most probable tokens whose probability reaches top_p (one sort);
    the rest become -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more probable tokens
    drop_sorted = mass_before >= top_p  # the top token always stays (mass_before 0 < top_p)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def cd_k_scores(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    """CD-K: log p_exp - log p_ama on V = {t : p_exp(t) >= alpha * (k-th largest p_exp)}, -inf elsewhere.
    k = 1 is contrastive decoding's max rule (Li et al. 2022)."""
    log_expert = expert_logits.log_softmax(dim=-1)
    log_amateur = amateur_logits.log_softmax(dim=-1)
    kth = log_expert.topk(min(k, log_expert.shape[-1]), dim=-1).values[..., -1:]
    floor = kth + (math.log(alpha) if alpha > 0 else float("-inf"))
    return (log_expert - log_amateur).masked_fill(log_expert < floor, float("-inf"))


def restrict_to(logits: torch.Tensor, allowed_mask: torch.Tensor) -> torch.Tensor:
    """-inf outside allowed_mask [V] (or broadcastable), e.g. text ids + <eod> while captioning."""
    return logits.masked_fill(~allowed_mask, float("-inf"))


def sample(scores: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from softmax(scores / temperature) [B, V] -> [B], by the exponential-race trick
    (argmax of p / Exp(1)), which needs no CPU sync, unlike torch.multinomial."""
    probs = (scores / temperature).softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return probs.div_(race).argmax(dim=-1)


def next_image_token(cond: torch.Tensor, uncond: torch.Tensor, sampling: SamplingConfig,
                     use_cd: torch.Tensor | None, generator: torch.Generator | None,
                     image_only: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row [B] from the streams' logits [B, V'], with CFG + top-p, greedy, or (rows where
    use_cd) CD-K; use_cd None means every row follows sampling.method. `image_only` (the third stream) switches
    CFG to `apply_image_text_guidance`; CD-K contrasts the full and unconditional streams either way."""
    if sampling.method == "cd_k" and use_cd is None:
        return sample(cd_k_scores(cond, uncond, sampling.cd_alpha, sampling.cd_k), sampling.temperature, generator)
    if image_only is None:
        guided = apply_guidance(cond, uncond, sampling.guidance_scale)
    else:
        guided = apply_image_text_guidance(cond, image_only, uncond, sampling.guidance_scale,
                                           sampling.image_guidance_scale)
    if sampling.method == "greedy" and use_cd is None:
        return guided.argmax(dim=-1)
    guided = top_p_filter(guided / sampling.temperature, sampling.top_p)
    if use_cd is not None:
        contrast = cd_k_scores(cond, uncond, sampling.cd_alpha, sampling.cd_k) / sampling.temperature
        guided = torch.where(use_cd[:, None], contrast, guided)
    return sample(guided, 1.0, generator)


# --- prompts --------------------------------------------------------------------------------------------------


def left_pad(prompts: Sequence[Sequence[int]], pad: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Prompts -> LongTensor [B, max len], shorter ones padded on the left so every row ends at the same position."""
    length = max(len(p) for p in prompts)
    return torch.tensor([[pad] * (length - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)


def key_padding(ids: torch.Tensor, vocab: Vocabulary, new_tokens: int) -> torch.Tensor | None:
    """[B, prompt + new] True at the left padding of each prompt; None when no row is padded (fast path)."""
    pads = ids == vocab.pad
    if not bool(pads.any()):
        return None
    return torch.cat([pads, pads.new_zeros(ids.shape[0], new_tokens)], dim=1)


def _upto(padding: torch.Tensor | None, length: int) -> torch.Tensor | None:
    return None if padding is None else padding[:, :length]


def check_vocab(model: CM3, vocab: Vocabulary) -> None:
    if model.config.vocab_size != vocab.size:
        raise ValueError(f"the model's vocab_size is {model.config.vocab_size} but the tokenizer's vocabulary has "
                         f"{vocab.size} ids; load the checkpoint that was trained with this tokenizer")


def check_room(model: CM3, prompt_len: int, new_tokens: int) -> None:
    limit = model.config.max_seq_len
    if prompt_len + new_tokens > limit:
        raise ValueError(f"a prompt of {prompt_len} tokens plus {new_tokens} to generate exceeds the model's "
                         f"max_seq_len {limit}: shorten the prompt (or use fewer retrieved documents)")


def default_generator(sampling: SamplingConfig, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed)
    return generator


# --- decoding loops -------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate_image_tokens(model: CM3, vocab: Vocabulary, prompts: Sequence[Sequence[int]], tokens_per_image: int,
                          sampling: SamplingConfig, methods_per_row: Sequence[str] | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Joint image ids [B, tokens_per_image], one image per prompt (each ending with the vocabulary's
    begin_image: <break>, or Chameleon's <racm3:break>).

    One prefill over the 2B cond+uncond rows (3B with image guidance), then one forward per token; only the image
    ids' logits are used, so every sampled id is an image id and there are exactly tokens_per_image of them. The
    closing end_image is forced, not sampled, so it is not returned.
    """
    check_vocab(model, vocab)
    if not prompts or tokens_per_image < 1:
        raise ValueError(f"need prompts and tokens_per_image >= 1, got {len(prompts)} and {tokens_per_image}")
    if any(not p or p[-1] != vocab.begin_image for p in prompts):
        raise ValueError("every text-to-image prompt must end with the begin-image token (see image_prompt)")
    B = len(prompts)
    device = model.tok_emb.weight.device
    use_cd = None
    if methods_per_row is not None:
        if len(methods_per_row) != B or any(m not in ROW_METHODS for m in methods_per_row):
            raise ValueError(f"methods_per_row needs one of {ROW_METHODS} per prompt ({B}), got {methods_per_row}")
        use_cd = torch.tensor([m == "cd_k" for m in methods_per_row], device=device)
    generator = generator or default_generator(sampling, device)

    image_only = [image_only_prompt(vocab, p) for p in prompts] if sampling.image_guidance_scale is not None else []
    streams = 3 if image_only else 2
    ids = left_pad([*prompts, *image_only, *[unconditional_prompt(vocab)] * B], vocab.pad, device)
    prompt_len = ids.shape[1]
    check_room(model, prompt_len, tokens_per_image + 1)  # + the closing end_image
    table = torch.from_numpy(vocab.image_id_table()).to(device)  # code -> joint id
    cache = model.new_kv_cache(streams * B, prompt_len + tokens_per_image - 1)
    padding = key_padding(ids, vocab, tokens_per_image)
    logits = model(ids, kv_cache=cache, key_padding=_upto(padding, prompt_len))[:, -1, table]
    out = torch.empty(B, tokens_per_image, dtype=torch.long, device=device)
    step_ids = torch.empty(streams * B, 1, dtype=torch.long, device=device)
    for i in range(tokens_per_image):
        codes = next_image_token(logits[:B], logits[-B:], sampling, use_cd, generator,
                                 logits[B:2 * B] if image_only else None)
        out[:, i] = codes
        if i + 1 == tokens_per_image:
            break
        step_ids.view(streams, B).copy_(table[codes])  # every stream continues with the same image
        logits = model(step_ids, kv_cache=cache, start_pos=prompt_len + i,
                       key_padding=_upto(padding, prompt_len + i + 1))[:, -1, table]
    return table[out]


@torch.inference_mode()
def generate_text(model: CM3, vocab: Vocabulary, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  sampling: SamplingConfig, stop_ids: Sequence[int] | None = None,
                  generator: torch.Generator | None = None) -> list[list[int]]:
    """New text ids per prompt (the stop id not included), restricted to text ids + stop_ids (default: the
    vocabulary's `stop_ids`); a row stops at its first stop id, the batch when every row has stopped or after
    max_new_tokens. No guidance: greedy or top-p."""
    stop_ids = vocab.stop_ids if stop_ids is None else stop_ids
    check_vocab(model, vocab)
    if sampling.method not in ("greedy", "top_p"):
        raise ValueError(f"text generation samples greedy or top_p, got {sampling.method!r}")
    if not prompts or any(not p for p in prompts) or max_new_tokens < 1:
        raise ValueError("need non-empty prompts and max_new_tokens >= 1")
    device = model.tok_emb.weight.device
    generator = generator or default_generator(sampling, device)
    ids = left_pad(prompts, vocab.pad, device)
    B, prompt_len = ids.shape
    check_room(model, prompt_len, max_new_tokens)
    allowed = torch.from_numpy(vocab.text_mask()).to(device)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    allowed[stops] = True

    cache = model.new_kv_cache(B, prompt_len + max_new_tokens)
    padding = key_padding(ids, vocab, max_new_tokens)
    logits = model(ids, kv_cache=cache, key_padding=_upto(padding, prompt_len))[:, -1]
    out = torch.full((B, max_new_tokens), vocab.pad, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps = 0
    for i in range(max_new_tokens):
        logits = restrict_to(logits, allowed)
        if sampling.method == "greedy":
            token = logits.argmax(dim=-1)
        else:
            token = sample(top_p_filter(logits / sampling.temperature, sampling.top_p), 1.0, generator)
        token = token.masked_fill(done, vocab.pad)
        out[:, i] = token
        steps = i + 1
        done |= torch.isin(token, stops)
        if bool(done.all()) or steps == max_new_tokens:
            break
        logits = model(token[:, None], kv_cache=cache, start_pos=prompt_len + i,
                       key_padding=_upto(padding, prompt_len + i + 1))[:, -1]
    return [_until_stop(row, set(stop_ids)) for row in out[:, :steps].tolist()]


def _until_stop(row: list[int], stops: set[int]) -> list[int]:
    return next((row[:i] for i, t in enumerate(row) if t in stops), row)


# --- tokenizer-level entry points -----------------------------------------------------------------------------


def text_to_image(model: CM3, tokenizer: MultimodalTokenizer, prompt: str, n: int,
                  sampling: SamplingConfig | None = None,
                  retrieved: Sequence[tuple[str, ArrayLike | torch.Tensor]] | None = None,
                  mix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """n images for one caption -> (images float [n, 3, H, W] in [-1, 1], image ids [n, tokens_per_image]).

    `retrieved` are (caption, VQ codes) documents prepended as `text <break> IMG <break>` (in the tokenizer's
    vocabulary: Chameleon's wraps each image in its own markers instead); `mix` samples the
    first half of the rows with top-p and the rest with CD-K (the paper's best FID recipe, before CLIP re-ranking).
    """
    sampling = sampling or SamplingConfig()
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    vocab = tokenizer.vocab
    docs = []
    for caption, codes in retrieved or ():
        codes = np.asarray(_codes(codes)).reshape(-1)
        if codes.size != tokenizer.tokens_per_image:
            raise ValueError(f"a retrieved image has {codes.size} codes but this tokenizer's images have "
                             f"{tokenizer.tokens_per_image}: build the index with the checkpoint's tokenizer")
        docs.append((tokenizer.encode_caption(caption), vocab.image_ids(codes).tolist()))
    ids = image_prompt(vocab, tokenizer.encode_caption(prompt), docs)
    methods = ["top_p"] * (n - n // 2) + ["cd_k"] * (n // 2) if mix else None
    image_ids = generate_image_tokens(model, tokenizer.vocab, [ids] * n, tokenizer.tokens_per_image, sampling,
                                      methods)
    return tokenizer.decode_image(image_ids), image_ids


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
