"""The decode engine: compiled (inductor) against eager, both against a no-cache reference, batch independence,
int8 weight-only, and its refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from cm3.model.config import CM3Config
from cm3.model.decoder import CM3
from cm3.model.engine import ImageEngine, ImageSample, left_pad, quantize_int8
from cm3.model.generation import image_prompt, unconditional_prompt
from cm3.model.sampling import SamplingConfig, choose_codes, row_sampling, uniform_draws
from cm3.tokenizers.vocabulary import Vocabulary

VOCAB = Vocabulary(text_vocab_size=50, image_vocab_size=16, num_sentinels=8, num_task_tokens=2)
UNCOND = unconditional_prompt(VOCAB)
TOKENS = 12  # a 4x4 grid would hold 16: the grid cells run out only in test_grid_cells_past_the_grid

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def random_model(positions: str, grid: int, seed: int = 0) -> CM3:
    torch.manual_seed(seed)
    config = CM3Config(vocab_size=VOCAB.size, n_layers=2, d_model=32, n_heads=4, max_seq_len=64, positions=positions,
                       image_grid=grid, image_offset=VOCAB.image_offset if grid else 0)
    model = CM3(config).eval()
    with torch.no_grad():
        for weight in model.parameters():  # out-projections too: at init every block is the identity
            weight.normal_(0.0, 0.3)
    return model


def caption(n: int, salt: int = 0) -> list[int]:
    return [VOCAB.text_offset + (7 * salt + 3 * j) % 50 for j in range(n)]


def retrieved_doc(salt: int) -> tuple[list[int], list[int]]:
    """A caption-first document as (text ids, image ids) (so the prompt holds a whole image)."""
    return caption(3, salt), [VOCAB.image_offset + (salt + j) % 16 for j in range(16)]


def mixed_samples() -> list[ImageSample]:
    """Four rows, four prompt lengths (two retrieval-augmented), four settings: CFG + top-p, CD-K, greedy, and
    top-p without guidance at another temperature, two seeds."""
    prompts = [image_prompt(VOCAB, caption(4)), image_prompt(VOCAB, caption(2, 1), [retrieved_doc(1)]),
               image_prompt(VOCAB, caption(6, 2), [retrieved_doc(2), retrieved_doc(3)]),
               image_prompt(VOCAB, caption(1))]
    configs = [SamplingConfig(seed=7, cd_k=2), SamplingConfig(seed=7, cd_k=2, guidance_scale=4.0),
               SamplingConfig(seed=7, cd_k=2, method="greedy"),
               SamplingConfig(seed=9, cd_k=2, guidance_scale=1.0, temperature=0.7, top_p=0.8)]
    methods = [None, "cd_k", None, None]
    return [ImageSample(tuple(p), c, i, m) for i, (p, c, m) in enumerate(zip(prompts, configs, methods))]


def engine(model: CM3, **kwargs) -> ImageEngine:
    return ImageEngine(model, VOCAB, UNCOND, TOKENS, rows=4, cd_k=2, **kwargs)


def reference_codes(model: CM3, samples: list[ImageSample], tokens: int = TOKENS) -> torch.Tensor:
    """No cache, no engine: the whole padded [cond; uncond] batch through the model every step."""
    B, lo = len(samples), VOCAB.image_offset
    seq = left_pad([*(s.prompt for s in samples), *[UNCOND] * B], VOCAB.pad)
    pads = seq == VOCAB.pad
    rows = row_sampling([s.sampling for s in samples], [s.method or s.sampling.method for s in samples],
                        [s.index for s in samples])
    codes = []
    with torch.no_grad():
        for step in range(tokens):
            padding = torch.cat([pads, pads.new_zeros(2 * B, step)], dim=1)
            logits = model(seq, key_padding=padding)[:, -1, lo:]
            code = choose_codes(logits[:B], logits[B:], rows, uniform_draws(rows.seeds, rows.samples, step))
            codes.append(code + lo)
            seq = torch.cat([seq, (code + lo).repeat(2)[:, None]], dim=1)
    return torch.stack(codes, dim=1)


MODELS = [("learned", 4), ("rope", 0)]


@pytest.mark.parametrize("positions, grid", MODELS)
def test_eager_engine_equals_the_no_cache_reference(positions, grid):
    model, samples = random_model(positions, grid), mixed_samples()
    codes = engine(model, window=8).generate(samples)  # windows of 8: the attention span grows in buckets
    assert torch.equal(codes, reference_codes(model, samples))
    assert VOCAB.is_image(codes.numpy()).all() and codes.shape == (4, TOKENS)


@pytest.mark.slow  # one inductor compilation each (about 30 s of CPU)
@pytest.mark.parametrize("positions, grid", MODELS)
def test_compiled_step_gives_the_eager_codes(positions, grid):
    """Same seed and settings -> the same codes, for CFG + top-p, CD-K, greedy and no guidance side by side, with
    retrieved documents of different lengths; the compiled engine run twice (state reset between calls)."""
    model, samples = random_model(positions, grid), mixed_samples()
    eager = engine(model, window=8).generate(samples)
    compiled = engine(model, window=8, compile=True)
    assert torch.equal(compiled.generate(samples), eager)
    swapped = [samples[1], samples[0]]  # a second call: other rows, fewer than the engine holds
    assert torch.equal(compiled.generate(swapped), eager[[1, 0]])


def test_a_rows_codes_do_not_depend_on_its_batch():
    model, samples = random_model("learned", 4), mixed_samples()
    together = engine(model).generate(samples)
    for i, sample in enumerate(samples):
        assert torch.equal(engine(model).generate([sample])[0], together[i])
    other_sample = ImageSample(samples[0].prompt, samples[0].sampling, index=1)
    assert not torch.equal(engine(model).generate([other_sample])[0], together[0])  # its own draws


def test_the_per_sample_mix_follows_each_rows_method():
    model = random_model("rope", 0)
    prompt = tuple(image_prompt(VOCAB, caption(5)))
    sampling = SamplingConfig(seed=3, cd_k=2)
    mixed = engine(model).generate([ImageSample(prompt, sampling, i, m)
                                    for i, m in enumerate(["top_p", "cd_k", "top_p", "cd_k"])])
    top_p = engine(model).generate([ImageSample(prompt, sampling, i) for i in range(4)])
    cd_k = engine(model).generate([ImageSample(prompt, sampling, i, "cd_k") for i in range(4)])
    assert torch.equal(mixed[0::2], top_p[0::2]) and torch.equal(mixed[1::2], cd_k[1::2])
    assert not torch.equal(top_p, cd_k)


def test_grid_cells_past_the_grid_match_the_reference():
    """20 tokens on a 4x4 grid: the last 4 get no grid embedding, as in a forward over the whole sequence."""
    model, samples = random_model("learned", 4), mixed_samples()[:2]
    codes = ImageEngine(model, VOCAB, UNCOND, 20, rows=2, cd_k=2, window=16).generate(samples)
    assert torch.equal(codes, reference_codes(model, samples, tokens=20))


def test_int8_weight_only_keeps_the_samples_close():
    model = random_model("learned", 4)
    quantized = quantize_int8(copy.deepcopy(model))
    from torchao.quantization import Int8Tensor

    assert all(isinstance(block.mlp.up.weight, Int8Tensor) for block in quantized.blocks)
    assert not isinstance(model.blocks[0].mlp.up.weight, Int8Tensor)
    ids = torch.tensor([image_prompt(VOCAB, caption(6))])
    with torch.no_grad():
        full, low = model(ids)[0, -1], quantized(ids)[0, -1]
    assert not torch.equal(full, low)
    assert (full - low).abs().max() < 0.05 * full.abs().max()
    samples = mixed_samples()
    greedy = [ImageSample(s.prompt, SamplingConfig(seed=0, cd_k=2, method="greedy"), i) for i, s in enumerate(samples)]
    same = (engine(quantized).generate(greedy) == engine(model).generate(greedy)).float().mean()
    assert same >= 0.75  # greedy codes mostly unchanged


def test_engine_refusals():
    model = random_model("rope", 0)
    eng = engine(model)
    prompt = tuple(image_prompt(VOCAB, caption(3)))
    with pytest.raises(ValueError, match="1 to 4 images"):
        eng.generate([ImageSample(prompt, SamplingConfig(seed=0, cd_k=2))] * 5)
    with pytest.raises(ValueError, match="exceeds"):
        eng.generate([ImageSample(tuple(image_prompt(VOCAB, caption(60))), SamplingConfig(seed=0, cd_k=2))])
    with pytest.raises(ValueError, match="cd_k"):
        eng.generate([ImageSample(prompt, SamplingConfig(seed=0, cd_k=3))])
    with pytest.raises(ValueError, match="<break>"):
        eng.generate([ImageSample(prompt[:-1], SamplingConfig(seed=0, cd_k=2))])
    with pytest.raises(ValueError, match="seed"):
        ImageSample(prompt, SamplingConfig(seed=None))
