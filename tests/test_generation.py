"""Generation: the logit rules on hand-made distributions, and the decoding loops against no-cache references."""

from __future__ import annotations

import math

import pytest
import torch

from cm3.model.config import CM3Config
from cm3.model.decoder import CM3
from cm3.model.engine import left_pad
from cm3.model.generation import (
    caption_image,
    generate_image_tokens,
    generate_text,
    image_prompt,
    rerank_by_clip,
    text_to_image,
    unconditional_prompt,
)
from cm3.model.sampling import (
    SamplingConfig,
    apply_guidance,
    cd_k_scores,
    restrict_to,
    sample,
    top_p_filter,
    uniform_draws,
)
from cm3.tokenizers.multimodal import MultimodalTokenizer
from cm3.tokenizers.text import TextTokenizer
from cm3.tokenizers.vocabulary import Vocabulary
from cm3.tokenizers.vqgan import VQGAN, VQGANConfig

VOCAB = Vocabulary(text_vocab_size=50, image_vocab_size=16, num_sentinels=8, num_task_tokens=2)
INF = float("inf")


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def random_model(vocab_size: int, max_seq_len: int = 96, seed: int = 0, **overrides) -> CM3:
    """Out-projections randomised too: at init every block is the identity, which would hide cache bugs."""
    torch.manual_seed(seed)
    config = CM3Config(vocab_size=vocab_size, n_layers=2, d_model=32, n_heads=4, max_seq_len=max_seq_len,
                       **overrides)
    model = CM3(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def model() -> CM3:
    return random_model(VOCAB.size)


@pytest.fixture(scope="module")
def tokenizer() -> MultimodalTokenizer:
    captions = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue", "yellow")
                for s in ("circle", "square", "triangle") for b in ("white", "black", "grey")]
    text = TextTokenizer.train(captions * 4, vocab_size=300)
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(ch=8, ch_mult=(1, 2, 2), z_channels=16, embed_dim=16, n_embed=16, resolution=32,
                           norm_groups=8, num_res_blocks=1, attn_resolutions=())).eval()
    return MultimodalTokenizer(text, vq)


def caption_prompts(lengths: list[int]) -> list[list[int]]:
    return [image_prompt(VOCAB, [VOCAB.text_offset + (7 * i + j) % 50 for j in range(n)])
            for i, n in enumerate(lengths)]


# --- pure functions -------------------------------------------------------------------------------------------


def test_guidance_formula_and_scale_one_is_the_conditional_logits():
    cond, uncond = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[1.0, 1.0, 0.5]])
    assert torch.allclose(apply_guidance(cond, uncond, 3.0), torch.tensor([[4.0, -2.0, -4.0]]))
    assert torch.allclose(apply_guidance(cond, uncond, 0.0), uncond)
    assert torch.equal(apply_guidance(cond, uncond, 1.0), cond)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False, False]
    assert kept(0.75) == [False, True, False, True]
    assert kept(0.9) == [True, True, False, True]
    assert kept(0.99) == [True, True, True, True]
    assert torch.equal(top_p_filter(logits, 0.75)[0, [1, 3]], logits[0, [1, 3]])  # kept logits unchanged


def test_cd_k_plausibility_set_uses_the_kth_largest_expert_probability():
    expert = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    amateur = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).log()
    contrast = expert - amateur
    # k = 1 is CD's rule: p >= alpha * max p = 0.2 -> {0.5, 0.3}
    scores = cd_k_scores(expert, amateur, alpha=0.4, k=1)
    assert torch.isfinite(scores)[0].tolist() == [True, True, False, False]
    assert torch.allclose(scores[0, :2], contrast[0, :2])
    assert scores[0, 2:].eq(-INF).all()
    assert scores.argmax().item() == 1  # the contrast prefers what the amateur under-rates, not the expert's argmax
    # k = 2: p >= 0.4 * 0.3 = 0.12 -> {0.5, 0.3, 0.15}; the 0.05 token stays out
    scores = cd_k_scores(expert, amateur, alpha=0.4, k=2)
    assert torch.isfinite(scores)[0].tolist() == [True, True, True, False]
    assert torch.allclose(scores[0, :3], contrast[0, :3])
    # log-softmax inside: scaling the logits' offset changes nothing
    assert torch.allclose(cd_k_scores(expert + 5.0, amateur - 2.0, 0.4, 2)[0, :3], contrast[0, :3])


def test_restrict_to_and_sample_never_leave_the_allowed_set():
    logits = torch.zeros(64, 10)
    allowed = torch.tensor([False, True, False, True] + [False] * 6)
    draws = uniform_draws(torch.zeros(64, dtype=torch.long), torch.arange(64), 0)
    drawn = sample(restrict_to(logits, allowed), draws)
    assert set(drawn.tolist()) == {1, 3}


def test_uniform_draws_are_a_function_of_seed_sample_and_step():
    seeds, samples = torch.tensor([0, 0, 1, 2**32 - 1]), torch.tensor([0, 1, 0, 0])
    draws = uniform_draws(seeds, samples, 3)
    assert torch.equal(uniform_draws(seeds, samples, torch.tensor([2, 3]))[1], draws)  # a table of steps
    assert torch.equal(draws[1:2], uniform_draws(seeds[1:2], samples[1:2], 3))  # rows are independent
    assert not torch.equal(draws, uniform_draws(seeds, samples, 4))
    assert len(set(draws.tolist())) == 4  # every (seed, sample) its own stream
    many = uniform_draws(torch.zeros(20000, dtype=torch.long), torch.arange(20000), 0)
    assert (many > 0).all() and (many < 1).all()
    assert abs(many.mean().item() - 0.5) < 0.01 and abs(many.var().item() - 1 / 12) < 0.005
    # the inverse CDF picks token j with probability p_j
    probs = torch.tensor([0.5, 0.3, 0.2])
    picks = sample(probs.log().expand(20000, 3), many).bincount(minlength=3) / 20000
    assert torch.allclose(picks, probs, atol=0.015)


def test_sampling_config_rejects_unknown_methods():
    with pytest.raises(ValueError, match="method"):
        SamplingConfig(method="beam")


# --- decoding loops -------------------------------------------------------------------------------------------


def test_guidance_scale_one_equals_plain_conditional_sampling(model):
    prompts = caption_prompts([5, 9])
    sampling = SamplingConfig(guidance_scale=1.0, top_p=0.9, temperature=0.8, seed=3)
    ours = generate_image_tokens(model, VOCAB, prompts, 12, sampling)

    # reference: only the conditional rows, padded to the length they have beside the unconditional rows
    # (padding hidden from attention), full forward every step (no cache)
    length = max(len(p) for p in [*prompts, unconditional_prompt(VOCAB)])
    seq = left_pad([[VOCAB.pad] * (length - len(p)) + p for p in prompts], VOCAB.pad)
    lo, rows = VOCAB.image_offset, torch.arange(len(prompts))
    with torch.no_grad():
        for step in range(12):
            logits = model(seq, key_padding=seq == VOCAB.pad)[:, -1, lo:]
            draws = uniform_draws(torch.full_like(rows, 3), rows, step)
            token = sample(top_p_filter(logits / 0.8, 0.9), draws) + lo
            seq = torch.cat([seq, token[:, None]], dim=1)
    assert torch.equal(ours, seq[:, length:])
    guided = generate_image_tokens(model, VOCAB, prompts, 12, SamplingConfig(guidance_scale=3.0, seed=3))
    assert not torch.equal(ours, guided)  # the unconditional stream does take part when scale != 1


def test_kv_cache_decoding_equals_full_recompute_under_greedy(model):
    prompts = caption_prompts([4, 7])
    sampling = SamplingConfig(method="greedy", guidance_scale=3.0)
    ours = generate_image_tokens(model, VOCAB, prompts, 6, sampling)

    B, lo = len(prompts), VOCAB.image_offset
    seq = left_pad([*prompts, *[unconditional_prompt(VOCAB)] * B], VOCAB.pad)
    start = seq.shape[1]
    with torch.no_grad():
        for _ in range(6):
            logits = model(seq, key_padding=seq == VOCAB.pad)[:, -1, lo:]
            token = apply_guidance(logits[:B], logits[B:], 3.0).argmax(-1) + lo
            seq = torch.cat([seq, token.repeat(2)[:, None]], dim=1)
    assert torch.equal(ours, seq[:B, start:])


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_left_padding_is_invisible_to_the_prompt_it_pads(positions):
    """A short prompt gives the same next-token logits alone and left-padded beside a longer one."""
    model = random_model(VOCAB.size, positions=positions)
    short, long_ = caption_prompts([3, 9])
    alone = model(torch.tensor([short]))[:, -1]
    batch = left_pad([short, long_], VOCAB.pad)
    padded = model(batch, key_padding=batch == VOCAB.pad)[:1, -1]
    unmasked = model(batch)[:1, -1]
    assert torch.allclose(alone, padded, atol=1e-4)
    assert not torch.allclose(alone, unmasked, atol=1e-2)


def test_per_row_method_mix_matches_the_pure_runs_row_by_row(model):
    prompts = caption_prompts([6, 6, 6, 6])
    sampling = SamplingConfig(seed=11, cd_k=2)
    mixed = generate_image_tokens(model, VOCAB, prompts, 10, sampling, methods_per_row=["top_p", "cd_k"] * 2)
    top_p = generate_image_tokens(model, VOCAB, prompts, 10, sampling)
    cd_k = generate_image_tokens(model, VOCAB, prompts, 10, SamplingConfig(seed=11, cd_k=2, method="cd_k"))
    assert torch.equal(mixed[0::2], top_p[0::2]) and torch.equal(mixed[1::2], cd_k[1::2])
    assert not torch.equal(top_p, cd_k)
    with pytest.raises(ValueError, match="methods_per_row"):
        generate_image_tokens(model, VOCAB, prompts, 4, sampling, methods_per_row=["greedy"] * 4)


def test_generate_text_stays_in_text_and_stops_per_row(model):
    prompts = [[VOCAB.eod, VOCAB.text_offset + 3, VOCAB.break_], [VOCAB.eod, VOCAB.text_offset + 9]]
    greedy = SamplingConfig(method="greedy")
    free = generate_text(model, VOCAB, prompts, 8, greedy)
    assert all(VOCAB.is_text(t) for row in free for t in row)
    stop = free[0][3]
    stopped = generate_text(model, VOCAB, prompts, 8, greedy, stop_ids=(VOCAB.eod, stop))
    assert stopped[0] == free[0][: free[0].index(stop)]  # cut before its first stop id
    sampled = generate_text(model, VOCAB, prompts, 8, SamplingConfig(seed=0))
    assert all(VOCAB.is_text(t) for row in sampled for t in row)


def test_text_to_image_emits_one_whole_image_and_decodes_it(tokenizer):
    vocab = tokenizer.vocab
    n, tokens = 3, tokenizer.tokens_per_image
    model = random_model(vocab.size, max_seq_len=128)
    images, ids = text_to_image(model, tokenizer, "a red circle on a white background", n, mix=True)
    assert tokens == 64 and ids.shape == (n, tokens)
    assert vocab.is_image(ids.numpy()).all()
    assert images.shape == (n, 3, 32, 32) and images.abs().max() <= 1.0


def test_retrieval_augmented_prompt_and_prompt_too_long(tokenizer):
    codes = torch.arange(64) % 16
    retrieved = [("a blue square on a black background", codes)]
    short = random_model(tokenizer.vocab.size, max_seq_len=128)
    with pytest.raises(ValueError, match="max_seq_len"):
        text_to_image(short, tokenizer, "a red circle", 1, retrieved=retrieved)
    roomy = random_model(tokenizer.vocab.size, max_seq_len=256)
    _, ids = text_to_image(roomy, tokenizer, "a red circle", 1, retrieved=retrieved)
    assert ids.shape == (1, 64)


def test_vocabulary_mismatch_is_a_clear_error(tokenizer):
    wrong = random_model(tokenizer.vocab.size + 1, max_seq_len=128)
    with pytest.raises(ValueError, match="vocab"):
        text_to_image(wrong, tokenizer, "a red circle", 1)
    with pytest.raises(ValueError, match="vocab"):
        caption_image(wrong, tokenizer, torch.zeros(1, 3, 32, 32))


def test_caption_image_returns_strings_and_stops_at_eod(tokenizer):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    model = random_model(tokenizer.vocab.size, max_seq_len=128)
    captions = caption_image(model, tokenizer, images, max_new_tokens=6)
    answers = caption_image(model, tokenizer, images, question="what shape?", max_new_tokens=6)
    assert len(captions) == len(answers) == 2 and all(isinstance(c, str) and c for c in captions + answers)
    # an output head of zeros ties every allowed id; greedy picks the lowest, <eod>: empty captions at once
    silent = random_model(tokenizer.vocab.size, max_seq_len=128, tie_embeddings=False)
    with torch.no_grad():
        silent.lm_head.weight.zero_()
    assert caption_image(silent, tokenizer, images) == ["", ""]


def test_rerank_by_clip_orders_best_first():
    images = torch.zeros(3, 3, 8, 8)
    order = rerank_by_clip(images, "a cat", lambda imgs, text: torch.tensor([0.1, 0.9, 0.5]))
    assert order.tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="scores"):
        rerank_by_clip(images, "a cat", lambda imgs, text: torch.tensor([0.1]))


def test_log_of_alpha_zero_keeps_every_token():
    expert, amateur = torch.randn(2, 7), torch.randn(2, 7)
    assert torch.isfinite(cd_k_scores(expert, amateur, alpha=0.0, k=3)).all()
    assert not math.isnan(float(cd_k_scores(expert, amateur, 0.1, 99).max()))  # k beyond V is clamped
