"""How the next token is chosen: classifier-free guidance, top-p, contrastive decoding (CD-K), temperature, and
the random draw, as pure functions on logits.

Every rule takes its settings either as numbers or as per-row tensors ([B, 1]), so one batch can hold rows of
different requests (guidance, temperature, top-p, method), and nothing in here reads a tensor back to the host:
the decode engine runs these rules inside its compiled, graph-captured step.

The draws are counter-based: the uniform draw of row (seed, sample) at step t is a hash of those integers, not
the state of a torch.Generator, and picks a token by inverse CDF. So a sample does not depend on which other rows
share its batch, on the device, or on whether the step is compiled; "the same seed gives the same codes" means
exactly that. (The engine computes a call's draws, tokens x rows floats, before its decode loop: inductor takes
minutes over the hash's chain of integer operations.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cm3.model.sampling_options import METHODS, SamplingConfig  # noqa: F401  (re-exported)

ROW_METHODS = ("top_p", "cd_k")  # what a per-row mix may hold (the paper's FID recipe mixes these two)

Setting = float | torch.Tensor  # one value for every row, or a tensor broadcasting against [B, V] ([B, 1])


def apply_guidance(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: Setting) -> torch.Tensor:
    """CFG: uncond + scale * (cond - uncond), written as cond + (scale - 1) * (cond - uncond) so that scale 1
    returns the conditional logits bit for bit."""
    return cond_logits + (scale - 1.0) * (cond_logits - uncond_logits)


def apply_image_text_guidance(full: torch.Tensor, image_only: torch.Tensor, uncond: torch.Tensor,
                              text_scale: Setting, image_scale: Setting) -> torch.Tensor:
    """Chameleon's CFG (InstructPix2Pix's): uncond + image_scale * (image_only - uncond)
    + text_scale * (full - image_only)."""
    return uncond + image_scale * (image_only - uncond) + text_scale * (full - image_only)


def top_p_filter(logits: torch.Tensor, top_p: Setting) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most probable tokens whose probability reaches top_p (one sort);
    the rest become -inf. Rows with top_p >= 1 keep every token."""
    if not isinstance(top_p, torch.Tensor) and top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more probable tokens
    drop_sorted = (mass_before >= top_p) & (top_p < 1.0)  # the top token always stays (mass_before 0 < top_p)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def cd_k_scores(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, alpha: Setting, k: int) -> torch.Tensor:
    """CD-K: log p_exp - log p_ama on V = {t : p_exp(t) >= alpha * (k-th largest p_exp)}, -inf elsewhere.
    k = 1 is contrastive decoding's max rule (Li et al. 2022); alpha 0 keeps every token."""
    log_expert = expert_logits.log_softmax(dim=-1)
    log_amateur = amateur_logits.log_softmax(dim=-1)
    kth = log_expert.topk(min(k, log_expert.shape[-1]), dim=-1).values[..., -1:]
    log_alpha = alpha.log() if isinstance(alpha, torch.Tensor) else (math.log(alpha) if alpha > 0 else -math.inf)
    return (log_expert - log_amateur).masked_fill(log_expert < kth + log_alpha, float("-inf"))


def restrict_to(logits: torch.Tensor, allowed_mask: torch.Tensor) -> torch.Tensor:
    """-inf outside allowed_mask [V] (or broadcastable), e.g. text ids + <eod> while captioning."""
    return logits.masked_fill(~allowed_mask, float("-inf"))


# --- counter-based draws --------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two xor-shift-multiply rounds) on int64 tensors holding values < 2**32; the
    multiplier is < 2**27, so no product overflows int64 and every device computes the same bits."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def uniform_draws(seeds: torch.Tensor, samples: torch.Tensor, steps: torch.Tensor | int) -> torch.Tensor:
    """Uniform draws in (0, 1), float32, a pure function of (seed, sample, step) per row: seeds and samples are
    int64 [B] in [0, 2**32); steps an int ([B] out) or an int64 tensor [T] ([T, B] out). One draw per row and
    step, whatever the vocabulary: a call's whole table is tokens x rows floats."""
    row = _mix32(_mix32(seeds & _MASK32) ^ samples)
    key = _mix32(row[None, :] ^ steps[:, None]) if isinstance(steps, torch.Tensor) else _mix32(row ^ steps)
    bits = _mix32(key)
    return ((bits >> 8).float() + 0.5) * 2.0**-24  # 24 bits, strictly inside (0, 1)


def sample(scores: torch.Tensor, draws: torch.Tensor | None) -> torch.Tensor:
    """One draw per row from softmax(scores) [B, V] -> [B] by inverse CDF: the first token whose cumulative
    probability passes the row's uniform draw [B] (no host sync, unlike torch.multinomial; compiles to one scan
    and one count). draws None is the argmax (greedy)."""
    probs = scores.softmax(dim=-1)
    if draws is None:
        return probs.argmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    below = cdf < draws[:, None] * cdf[:, -1:]
    return below.sum(dim=-1).clamp(max=scores.shape[-1] - 1)


@dataclass
class RowSampling:
    """Per-row settings of a batch as tensors [B] on the device (see `row_sampling`); `cd_k` is the batch's."""

    seeds: torch.Tensor  # int64: the request's seed
    samples: torch.Tensor  # int64: which sample of that seed (its noise stream)
    guidance: torch.Tensor  # float32: CFG scale
    temperature: torch.Tensor  # float32
    top_p: torch.Tensor  # float32
    cd_alpha: torch.Tensor  # float32
    use_cd: torch.Tensor  # bool: CD-K instead of CFG + top-p
    image_guidance: torch.Tensor  # float32: Chameleon's image scale (read only with an image-only stream)
    greedy: torch.Tensor  # bool: argmax of the guided logits
    cd_k: int = 5


def row_sampling(configs: list[SamplingConfig], methods: list[str], samples: list[int],
                 device: torch.device | str = "cpu") -> RowSampling:
    """RowSampling for rows with their own config, method ("top_p", "cd_k" or "greedy") and sample index; the
    configs must agree on cd_k (it sizes a top-k)."""
    if len({c.cd_k for c in configs}) > 1:
        raise ValueError(f"rows of one batch must share cd_k, got {sorted({c.cd_k for c in configs})}")
    if any(c.seed is None for c in configs):
        raise ValueError("row_sampling needs a seed per row (draw one for seed=None first)")

    def floats(values):
        return torch.tensor(values, dtype=torch.float32, device=device)

    return RowSampling(
        seeds=torch.tensor([c.seed for c in configs], dtype=torch.long, device=device),
        samples=torch.tensor(samples, dtype=torch.long, device=device),
        guidance=floats([c.guidance_scale for c in configs]), temperature=floats([c.temperature for c in configs]),
        top_p=floats([c.top_p for c in configs]), cd_alpha=floats([c.cd_alpha for c in configs]),
        image_guidance=floats([1.0 if c.image_guidance_scale is None else c.image_guidance_scale for c in configs]),
        use_cd=torch.tensor([m == "cd_k" for m in methods], device=device),
        greedy=torch.tensor([m == "greedy" for m in methods], device=device),
        cd_k=configs[0].cd_k if configs else 5)


def choose_codes(cond: torch.Tensor, uncond: torch.Tensor, rows: RowSampling, draws: torch.Tensor,
                 image_only: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row [B] from the conditional and unconditional logits [B, V] and this step's draws [B]
    (`uniform_draws`): CFG then temperature then top-p; CD-K (over temperature) on rows with use_cd; the guided
    argmax on greedy rows. `image_only` (Chameleon's third stream) switches CFG to `apply_image_text_guidance`;
    CD-K contrasts the full and unconditional streams either way."""
    column = lambda t: t[:, None]  # noqa: E731
    if image_only is None:
        guided = apply_guidance(cond, uncond, column(rows.guidance))
    else:
        guided = apply_image_text_guidance(cond, image_only, uncond, column(rows.guidance),
                                           column(rows.image_guidance))
    guided = top_p_filter(guided / column(rows.temperature), column(rows.top_p))
    contrast = cd_k_scores(cond, uncond, column(rows.cd_alpha), rows.cd_k) / column(rows.temperature)
    scores = torch.where(column(rows.use_cd), contrast, guided)
    codes = sample(scores, draws)
    return torch.where(rows.greedy, scores.argmax(dim=-1), codes)
