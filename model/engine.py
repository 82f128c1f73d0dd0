"""The decode engine: text -> image tokens with classifier-free guidance, one fixed-shape step per token.

The eager loop it replaced spent its time in Python and kernel launches, not in the GPU. The engine keeps everything
that runs per token inside one step function over buffers allocated once:

- a static KV cache (conditional rows, then, with Chameleon's guidance, their image-only twins, then their
  unconditional twins) written at a tensor position with
  `index_copy_`; attention reads only the live part, `[0, window)`, where the window grows in buckets of
  `window` positions (one compiled graph with a dynamic window, one CUDA graph per bucket);
- prefill once per distinct prompt (the unconditional prompt once for every row), logits at the last position
  only, the rows then tiled from it; prompts of different lengths (retrieved documents) are left-padded, each
  row's pads hidden from attention and its positions counted from its first real token;
- the step: embed the previous code (its position and image-grid cell), the blocks, the output head over the
  image tokens only (the vocabulary's image ids: one contiguous slice in cm3's vocabulary, a table in
  Chameleon's), CFG / temperature / top-p / CD-K / greedy per row (`sampling.choose_codes`, reading the call's
  counter-based draws, made at prefill), the code written to an output buffer;
  `torch.compile(fullgraph=True)` and, on CUDA, captured with `torch.cuda.graph` and replayed; one host read at
  the end.

"Same samples" means the same codes for the same seed and settings: the step compiled or captured gives the
codes of the step run eagerly (tests/test_engine.py checks it under inductor on the CPU), and a row's codes
depend only on its prompt, seed, sample index and settings, not on the other rows of its batch.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cm3.model.decoder import CM3
from cm3.model.sampling import ROW_METHODS, RowSampling, SamplingConfig, choose_codes, row_sampling, uniform_draws
from cm3.tokenizers.layout import image_only_prompt
from cm3.tokenizers.vocabulary import Vocabulary


def left_pad(prompts: Sequence[Sequence[int]], pad: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Prompts -> LongTensor [B, max len], shorter ones padded on the left so every row ends at the same position."""
    length = max(len(p) for p in prompts)
    return torch.tensor([[pad] * (length - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)


def pad_mask(prompts: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> torch.Tensor | None:
    """[B, max len] True at each row's left padding (see `left_pad`); None when every prompt has the same length."""
    lengths = [len(p) for p in prompts]
    if len(set(lengths)) == 1:
        return None
    longest = max(lengths)
    return torch.tensor([[i < longest - n for i in range(longest)] for n in lengths], device=device)


def check_vocab(model: CM3, vocab: Vocabulary) -> None:
    if model.config.vocab_size != vocab.size:
        raise ValueError(f"the model's vocab_size is {model.config.vocab_size} but the tokenizer's vocabulary has "
                         f"{vocab.size} ids; load the checkpoint that was trained with this tokenizer")


@dataclass(frozen=True)
class ImageSample:
    """One image to sample: its prompt (joint ids ending with the vocabulary's begin_image: cm3's <break>), its
    sampling settings (seed set), which
    sample of that seed it is (its noise stream), and its method when it differs from sampling.method (the
    paper's per-sample mix of top-p and CD-K)."""

    prompt: tuple[int, ...]
    sampling: SamplingConfig
    index: int = 0
    method: str | None = None

    def __post_init__(self) -> None:
        if self.sampling.seed is None:
            raise ValueError("an ImageSample needs sampling.seed (draw one for an unseeded request)")
        if self.method is not None and self.method not in ROW_METHODS:
            raise ValueError(f"a per-sample method must be one of {ROW_METHODS}, got {self.method!r}")
        if not 0 <= self.index < 2**31:
            raise ValueError(f"sample index must be in [0, 2**31), got {self.index}")


@dataclass
class _CacheWindow:
    """What each block's attention sees during a step: it writes its new key/value at `position` (a tensor [1])
    into its layer's buffer and reads positions [0, window) of it."""

    keys: list[torch.Tensor]  # per layer [streams * B, heads, max_len + 1, head_dim]: separate buffers, so that a compiled
    values: list[torch.Tensor]  # step writes each in place (a view of one big buffer would be rewritten whole)
    window: int | torch.SymInt

    def update(self, layer: int, position: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer].index_copy_(2, position, k)
        self.values[layer].index_copy_(2, position, v)
        return self.keys[layer][:, :, :self.window], self.values[layer][:, :, :self.window]


@dataclass
class _State:
    """The buffers a step reads and writes; allocated once, written in place, never rebound."""

    step: torch.Tensor  # 0-d: index of the token the next step samples
    write_base: torch.Tensor  # 0-d: prompt length - 1 (token t-1 goes to position write_base + t)
    pads: torch.Tensor  # [streams * B] left padding per row
    cell0: torch.Tensor  # [streams * B] grid cell of the first image token (-1: none)
    last: torch.Tensor  # [B] the codes sampled last (image-relative)
    out: torch.Tensor  # [B, tokens]
    draws: torch.Tensor  # [tokens, B]: every uniform draw of the call, made at prefill
    rows: RowSampling
    key_positions: torch.Tensor  # arange(max_len + 1): sliced to the window each step
    graphs: dict = field(default_factory=dict)


class ImageEngine:
    """Samples `tokens` image codes for up to `rows` prompts at a time (a call with fewer rows fills the rest).

    `max_len` bounds prompt + tokens - 1 (default: the model's context). `compile` runs the step through
    `torch.compile(fullgraph=True)`; `cuda_graphs` (default: on a CUDA device) captures one CUDA graph per window
    bucket and replays it. `cd_k` is the batch's CD-K top-k (the other settings are per row). `image_guidance`
    adds Chameleon's third stream (the prompt's images alone; every sample then sets image_guidance_scale).
    Calls are serialised: one engine decodes one batch at a time.
    """

    def __init__(self, model: CM3, vocab: Vocabulary, unconditional: Sequence[int], tokens: int, rows: int,
                 max_len: int | None = None, *, compile: bool = False, cuda_graphs: bool | None = None,
                 window: int = 128, cd_k: int = 5, image_guidance: bool = False):
        config = model.config
        check_vocab(model, vocab)
        max_len = max_len or config.max_seq_len
        if tokens < 1 or rows < 1 or window < 1 or not len(unconditional) < max_len <= config.max_seq_len:
            raise ValueError(f"need tokens, rows, window >= 1 and len(unconditional) < max_len <= max_seq_len "
                             f"{config.max_seq_len}; got {tokens}, {rows}, {window}, max_len {max_len}")
        self.model, self.vocab, self.unconditional = model, vocab, tuple(unconditional)
        self.tokens, self.rows, self.max_len, self.window, self.cd_k = tokens, rows, max_len, window, cd_k
        device = model.tok_emb.weight.device
        self.device = device
        table = torch.from_numpy(vocab.image_id_table()).to(device)  # code -> joint id
        self.table = table
        contiguous = bool((table == table[0] + torch.arange(len(table), device=device)).all())
        # the output head's image rows: a slice where the ids are one range (cm3), else an index (Chameleon)
        self.columns = slice(int(table[0]), int(table[0]) + len(table)) if contiguous else table
        self.image_guidance = image_guidance
        self.streams = 3 if image_guidance else 2
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and device.type != "cuda":
            raise ValueError("cuda_graphs needs the model on a CUDA device")
        self.compiled = compile
        layout = model.new_kv_cache(self.streams * rows, 1).keys[0]  # the decoder owns the cache's shape and dtype
        # one position more than a window reaches: a window as long as the buffer would be a no-op slice, which a
        # compiled step specialises on (a second compilation)
        shape = (*layout.shape[:2], max_len + 1, layout.shape[3])
        self.keys = [layout.new_zeros(shape) for _ in range(config.n_layers)]
        self.values = [layout.new_zeros(shape) for _ in range(config.n_layers)]
        long = dict(dtype=torch.long, device=device)
        self.state = _State(
            step=torch.zeros((), **long), write_base=torch.zeros((), **long),
            pads=torch.zeros(self.streams * rows, **long), cell0=torch.full((self.streams * rows,), -1, **long),
            last=torch.zeros(rows, **long), out=torch.zeros(rows, tokens, **long),
            draws=torch.full((tokens, rows), 0.5, device=device),
            rows=row_sampling([SamplingConfig(seed=0, cd_k=cd_k)] * rows, ["top_p"] * rows, [0] * rows, device),
            key_positions=torch.arange(max_len + 1, device=device))
        self._step_fn = torch.compile(self._step, fullgraph=True, dynamic=False) if compile else self._step
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._lock = threading.Lock()

    def max_prompt_len(self) -> int:
        """The longest prompt a call takes (prompt + tokens - 1 positions must fit the cache)."""
        return self.max_len - self.tokens + 1

    @torch.no_grad()
    def generate(self, samples: Sequence[ImageSample]) -> torch.Tensor:
        """Joint image ids [len(samples), tokens] (on the model's device), one image per sample."""
        if not 1 <= len(samples) <= self.rows:
            raise ValueError(f"this engine samples 1 to {self.rows} images per call, got {len(samples)}")
        for sample in samples:
            if not sample.prompt or sample.prompt[-1] != self.vocab.begin_image:
                raise ValueError(f"every text-to-image prompt must end with the begin-image token "
                                 f"{self.vocab.token_name(self.vocab.begin_image)} (see image_prompt)")
            if (sample.sampling.image_guidance_scale is not None) != self.image_guidance:
                raise ValueError("this engine decodes " + ("with" if self.image_guidance else "without")
                                 + " Chameleon's image guidance; a sample's image_guidance_scale must "
                                 + ("be set" if self.image_guidance else "be None"))
            if len(sample.prompt) > self.max_prompt_len():
                raise ValueError(f"a prompt of {len(sample.prompt)} tokens plus {self.tokens} to generate exceeds "
                                 f"the engine's {self.max_len} positions: shorten the prompt (or use fewer "
                                 "retrieved documents)")
            if sample.sampling.cd_k != self.cd_k:
                raise ValueError(f"this engine decodes with cd_k {self.cd_k}, a sample asks for {sample.sampling.cd_k}")
        filled = [*samples, *[samples[0]] * (self.rows - len(samples))]
        with self._lock:
            prompt_len = self._prefill(filled)
            for t in range(1, self.tokens):
                live = prompt_len + t  # the step writes token t-1 at position prompt_len + t - 1
                self._run(min(self.max_len, math.ceil(live / self.window) * self.window))
            return self.table[self.state.out[:len(samples)]]

    def _prefill(self, samples: Sequence[ImageSample]) -> int:
        """Run each distinct prompt once, tile the rows into the static cache, sample token 0; the prompt length."""
        model, state, B = self.model, self.state, self.rows
        image_only = [tuple(image_only_prompt(self.vocab, s.prompt)) for s in samples] if self.image_guidance else []
        prompts = list(dict.fromkeys([self.unconditional, *(s.prompt for s in samples), *image_only]))
        ids = left_pad(prompts, self.vocab.pad, self.device)
        prompt_len = ids.shape[1]
        cache = model.new_kv_cache(len(prompts), prompt_len)
        hidden = model.hidden(ids, kv_cache=cache, key_padding=pad_mask(prompts, self.device))
        logits = model.head(hidden[:, -1], self.columns)
        # cond rows, then (with image guidance) their image-only twins, then the uncond twins
        source = [prompts.index(s.prompt) for s in samples] + [prompts.index(p) for p in image_only] + [0] * B
        index = torch.tensor(source, device=self.device)
        for layer in range(len(self.keys)):
            self.keys[layer][:, :, :prompt_len].copy_(cache.keys[layer].index_select(0, index))
            self.values[layer][:, :, :prompt_len].copy_(cache.values[layer].index_select(0, index))
        state.pads.copy_(torch.tensor([prompt_len - len(prompts[i]) for i in source]))
        state.cell0.copy_(cache.next_cell.index_select(0, index))
        fresh = row_sampling([s.sampling for s in samples], [s.method or s.sampling.method for s in samples],
                             [s.index for s in samples], self.device)
        for name in ("seeds", "samples", "guidance", "temperature", "top_p", "cd_alpha", "use_cd", "image_guidance",
                     "greedy"):
            getattr(state.rows, name).copy_(getattr(fresh, name))
        state.draws.copy_(uniform_draws(fresh.seeds, fresh.samples, torch.arange(self.tokens, device=self.device)))
        state.write_base.fill_(prompt_len - 1)
        state.step.fill_(1)
        third = logits[index[B:2 * B]] if self.image_guidance else None
        codes = choose_codes(logits[index[:B]], logits[:1].expand(B, -1), state.rows, state.draws[0], third)
        state.out[:, 0] = codes
        state.last.copy_(codes)
        return prompt_len

    def _run(self, window: int) -> None:
        key_positions = self.state.key_positions[:window]
        if self.compiled:
            torch._dynamo.mark_dynamic(key_positions, 0, min=2, max=self.max_len)
        if not self.cuda_graphs:
            self._step_fn(key_positions)
            return
        graph = self.state.graphs.get(window)
        if graph is not None:
            graph.replay()
            return
        # first use of this window: the step runs for real on a side stream (warm-up and compilation), then the
        # same call is captured (capturing runs nothing) and replayed from the next step of this window on
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step_fn(key_positions)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step_fn(key_positions)
        self.state.graphs[window] = graph

    def _step(self, key_positions: torch.Tensor) -> None:
        """Embed the last codes, run the blocks over the cache window, sample the next codes into `out`."""
        model, state, B = self.model, self.state, self.rows
        t = state.step
        write = state.write_base + t
        codes = self.table[state.last]
        ids = codes.repeat(self.streams)[:, None]  # every stream continues with the same image
        positions = (write - state.pads)[:, None]
        cells = None
        if model.row_emb is not None:
            cell = state.cell0 + t - 1
            grid_cells = model.config.image_grid ** 2
            cells = torch.where((state.cell0 >= 0) & (cell < grid_cells), cell, -1)[:, None]
        x, rope = model.embed(ids, positions, cells)
        visible = (key_positions <= write) & (key_positions >= state.pads[:, None])
        mask = visible[:, None, None, :]
        cache = _CacheWindow(self.keys, self.values, key_positions.shape[0])
        position = write.view(1)
        for block in model.blocks:
            x = block(x, rope, cache, position, mask)
        logits = model.head(x[:, -1], self.columns)
        third = logits[B:2 * B] if self.image_guidance else None
        chosen = choose_codes(logits[:B], logits[-B:], state.rows, state.draws.index_select(0, t.view(1))[0], third)
        state.out.index_copy_(1, t.view(1), chosen[:, None])
        state.last.copy_(chosen)
        state.step.add_(1)


def quantize_int8(model: CM3) -> CM3:
    """int8 weight-only quantisation (torchao) of every linear layer in the blocks, in place; the output head
    (the token embedding, tied) and the embeddings stay in the model's dtype. Decoding reads about half the
    bytes per step; samples change a little (benchmarks/generate.py measures how much)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model.blocks, Int8WeightOnlyConfig())
    return model
