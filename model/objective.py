"""The CM3 causal-masked objective (metaseq `cm3_dataset.py`): cut spans out, append them at the end.

    Image of a chameleon : <break> IMG   ->   Image of <mask:0> : <break> IMG <mask:0> a chameleon <eoss>

A causal decoder trained on the right-hand side learns left-to-right generation and, by reading the whole body
before the span, infilling. Spans never leave a run of text/image tokens, so they never cross a `<break>`, an
`<eod>` (document boundary) or any other special token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike

from cm3.tokenizers.vocabulary import Vocabulary


@dataclass(frozen=True)
class Transformed:
    """One CM3 training sequence.

    The model reads `ids[:-1]` and predicts `ids[1:]`; `loss_weights[t]` weights predicting `ids[t + 1]` from
    `ids[:t + 1]` (so it is one shorter than `ids`). It is 0 where that target is a `<mask:i>` placeholder in the
    body (the model cannot know where a span was cut) or `<pad>`, and 1 everywhere else, the appended
    `<mask:i> span <eoss>` included. `spans` are (start, end, i): source[start:end] became `<mask:i>`.
    `cm3_inverse(ids)` gives back `source[:source_len]`.
    """

    ids: np.ndarray
    loss_weights: np.ndarray
    spans: list[tuple[int, int, int]]
    source_len: int


def cm3_transform(ids: ArrayLike, vocab: Vocabulary, rng: np.random.Generator, max_len: int,
                  poisson_lambda: float = 1.0, max_spans: int | None = None) -> Transformed:
    """Draw k ~ Poisson(poisson_lambda) spans (k = 0: plain causal LM) and move them to the end.

    k is clamped to `max_spans` (default: num_sentinels - 1, as metaseq clamps). Every span adds 3 tokens
    (`<mask:i>` in the body, `<mask:i>` and `<eoss>` at the end), so the source is first cut to
    `max_len - 3k` tokens and the spans drawn inside what is kept: the result always fits `max_len` and always
    decodes back to an intact prefix of the source, never to a sequence with a half-appended span.
    """
    ids = _as_ids(ids, vocab)
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if max_spans is None:
        max_spans = max(vocab.num_sentinels - 1, 0)
    elif not 0 <= max_spans <= vocab.num_sentinels:
        raise ValueError(f"max_spans must be in [0, {vocab.num_sentinels}] (one sentinel per span), got {max_spans}")
    k = min(int(rng.poisson(poisson_lambda)), max_spans, (max_len - 1) // 3)
    source = ids[: max_len - 3 * k]
    return mask_spans(source, sample_spans(content_runs(source, vocab), k, rng), vocab)


def content_runs(ids: np.ndarray, vocab: Vocabulary) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of text/image ids: the only places a span may be cut from."""
    content = (vocab.is_text(ids) | vocab.is_image(ids)).astype(np.int8)
    edges = np.diff(np.concatenate([[0], content, [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def sample_spans(runs: list[tuple[int, int]], k: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to k disjoint, non-empty spans, sorted, each inside one run.

    metaseq's sampler, moved inside runs: k^2 candidates, each in a run picked in proportion to its length (so
    positions are uniform over content tokens), bounds floor(u0 * L) and round(u1 * L) with u0 <= u1 uniform;
    candidates are kept greedily while they do not overlap the ones kept. Fewer than k spans is fine.
    """
    if k == 0 or not runs:
        return []
    starts, ends = np.array(runs).T
    lengths = ends - starts
    chosen = rng.choice(len(runs), size=k * k, p=lengths / lengths.sum())
    bounds = np.sort(rng.random((k * k, 2)), axis=1)
    spans: list[tuple[int, int]] = []
    for run, (u0, u1) in zip(chosen, bounds):
        start = int(starts[run] + int(u0 * lengths[run]))
        end = int(starts[run] + int(u1 * lengths[run] + 0.5))
        if start < end and all(end <= s or start >= e for s, e in spans):
            spans.append((start, end))
            if len(spans) == k:
                break
    return sorted(spans)


def mask_spans(ids: ArrayLike, spans: list[tuple[int, int]], vocab: Vocabulary) -> Transformed:
    """Replace sorted, disjoint spans of text/image ids by `<mask:0>`, `<mask:1>`, ... and append
    `<mask:i> span <eoss>` for each at the end. Also the way to build a hand-made example."""
    ids = _as_ids(ids, vocab)
    _check_spans(ids, spans, vocab)
    body, tail, previous = [], [], 0
    for i, (start, end) in enumerate(spans):
        sentinel = [vocab.sentinel(i)]
        body += [ids[previous:start], sentinel]
        tail += [sentinel, ids[start:end], [vocab.eoss]]
        previous = end
    body.append(ids[previous:])
    out = np.concatenate(body + tail).astype(np.int64)
    body_len = sum(len(part) for part in body)
    targets, target_pos = out[1:], np.arange(1, len(out))
    placeholder = (target_pos < body_len) & vocab.is_sentinel(targets)
    weights = np.where(placeholder | (targets == vocab.pad), 0.0, 1.0).astype(np.float32)
    return Transformed(out, weights, [(s, e, i) for i, (s, e) in enumerate(spans)], len(ids))


def cm3_inverse(transformed_ids: ArrayLike, vocab: Vocabulary) -> np.ndarray:
    """Put the appended spans back in place of their `<mask:i>`: the source a (complete) transform came from.

    The body holds `<mask:0> ... <mask:k-1>` once each, in order; the appended part starts at the second
    `<mask:0>`. Raises ValueError on a sequence no transform produces (e.g. one cut inside the appended part).
    """
    ids = np.asarray(transformed_ids, dtype=np.int64).reshape(-1)
    if vocab.num_sentinels == 0 or not (ids == vocab.sentinel(0)).any():
        return ids.copy()
    firsts = np.flatnonzero(ids == vocab.sentinel(0))
    if len(firsts) != 2:
        raise ValueError(f"expected <mask:0> twice (body and appended span), found it {len(firsts)} time(s)")
    body, tail = ids[: firsts[1]], ids[firsts[1]:]
    placeholders = np.flatnonzero(vocab.is_sentinel(body))
    expected = [vocab.sentinel(i) for i in range(len(placeholders))]
    if body[placeholders].tolist() != expected:
        raise ValueError(f"body placeholders should be <mask:0..{len(expected) - 1}> in order, "
                         f"got {[vocab.token_name(t) for t in body[placeholders]]}")
    spans, pos = [], 0
    for i, sentinel in enumerate(expected):
        if pos >= len(tail) or tail[pos] != sentinel:
            raise ValueError(f"appended span {i} should start with <mask:{i}> at position {firsts[1] + pos}")
        stops = np.flatnonzero(tail[pos + 1:] == vocab.eoss)
        if not len(stops):
            raise ValueError(f"appended span {i} has no closing <eoss>")
        spans.append(tail[pos + 1: pos + 1 + stops[0]])
        pos += stops[0] + 2
    if pos != len(tail):
        raise ValueError(f"{len(tail) - pos} token(s) after the last appended span")
    pieces, previous = [], 0
    for placeholder, span in zip(placeholders, spans):
        pieces += [body[previous:placeholder], span]
        previous = placeholder + 1
    pieces.append(body[previous:])
    return np.concatenate(pieces).astype(np.int64)


def cm3_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean next-token cross-entropy: logits [B, T, V] score targets [B, T] (ids[:, 1:]) with
    weights [B, T] (the `loss_weights`, zero on placeholders and padding); an all-zero batch gives 0."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    weights = weights.flatten().to(ce.dtype)
    return (ce * weights).sum() / weights.sum().clamp_min(1.0)


def _as_ids(ids: ArrayLike, vocab: Vocabulary) -> np.ndarray:
    array = np.asarray(ids)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"expected a 1-D sequence of integer ids, got shape {array.shape} dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= vocab.size):
        raise ValueError(f"ids must be in [0, {vocab.size}), got range [{array.min()}, {array.max()}]")
    return array


def _check_spans(ids: np.ndarray, spans: list[tuple[int, int]], vocab: Vocabulary) -> None:
    if vocab.is_sentinel(ids).any():
        raise ValueError("the source already holds <mask:i> ids; its transform could not be inverted")
    if len(spans) > vocab.num_sentinels:
        raise ValueError(f"{len(spans)} spans but only {vocab.num_sentinels} sentinels")
    previous_end = 0
    for start, end in spans:
        if not previous_end <= start < end <= len(ids):
            raise ValueError(f"spans must be sorted, disjoint, non-empty and inside [0, {len(ids)}): got {spans}")
        if not (vocab.is_text(ids[start:end]) | vocab.is_image(ids[start:end])).all():
            raise ValueError(f"span ({start}, {end}) holds a special or task token; spans stay inside one run of "
                             "text/image ids (never across <break> or <eod>)")
        previous_end = end
