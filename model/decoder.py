"""The CM3Leon decoder: one OPT/metaseq-style transformer over the joint text+image vocabulary.

Pre-LN blocks, no biases, no dropout, LayerNorm without parameters, learned absolute positions (or RoPE),
ReLU MLP (or SwiGLU), optionally DALL-E's row/column embeddings on image tokens. A static, preallocated KV
cache serves prefill and token-by-token decoding. The options that Chameleon's checkpoints need (RMSNorm,
grouped-query attention, per-head query-key LayerNorm affines, swin-norm block order) are off by default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from cm3.core.errors import InputError
from cm3.core.files import atomic_write
from cm3.core.intact import load_json, safetensors_header
from cm3.tokenizers.vocabulary import DEFAULT_VOCABULARY, Vocabulary

from .config import CM3Config
from .loss import linear_cross_entropy

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"  # sharded weights (a converted 7B): {"weight_map": {key: file}}
CONFIG_NAME = "config.json"
TOKENIZER_DIR = "tokenizer"  # a cm3 checkpoint's tokenizer folder (cm3.model.checkpoint)


class KVCache:
    """Keys and values of every layer, allocated once for `max_len` positions: decoding writes in place.

    Rows are batch rows; `repeat`/`reorder` build the cond/uncond row layouts that guidance needs.
    """

    def __init__(self, batch: int, max_len: int, n_layers: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # per row, the grid cell the next token takes if it is an image id (-1: none), so that token-by-token
        # decoding places image tokens on the grid exactly as a forward over the whole sequence does
        self.next_cell = torch.full((batch,), -1, dtype=torch.long, device=device)

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write positions [start_pos, start_pos + T) of one layer; return that layer's keys/values [0, end)."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to {end}")
        self.keys[layer, :, :, start_pos:end] = k
        self.values[layer, :, :, start_pos:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def reset(self) -> None:
        self.keys.zero_()
        self.values.zero_()
        self.next_cell.fill_(-1)

    def copy(self) -> KVCache:
        return self._with(self.keys.clone(), self.values.clone(), self.next_cell.clone())

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/permute/duplicate batch rows in place: row i becomes old row index[i] (beam search, CFG)."""
        index = index.to(self.keys.device)
        self.keys = self.keys.index_select(1, index)
        self.values = self.values.index_select(1, index)
        self.next_cell = self.next_cell.index_select(0, index)

    def repeat(self, n: int) -> KVCache:
        """A new cache with the rows tiled n times ([a, b] -> [a, b, a, b]), e.g. one prompt for cond and uncond."""
        return self._with(self.keys.repeat(1, n, 1, 1, 1), self.values.repeat(1, n, 1, 1, 1),
                          self.next_cell.repeat(n))

    @classmethod
    def _with(cls, keys: torch.Tensor, values: torch.Tensor, next_cell: torch.Tensor) -> KVCache:
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.next_cell = keys, values, next_cell
        return cache


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim/2] (or [B, 1, T, head_dim/2] for per-row positions [B, T]) in float32, computed per
    call so they never get cast to bf16 with the model."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    if positions.dim() == 2:
        angles = angles[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head (GPT-NeoX layout) of x [B, H, T, head_dim]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def image_cells(ids: torch.Tensor, image_offset: int, cells: int,
                carry: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid cell (raster index 0..cells-1) of every image id in ids [B, T], -1 elsewhere; and each row's cell
    for a next image token (the carry into the following call; `carry` [B] is this call's, None = a fresh row).

    An image is a run of image ids opened by `<eod>` or `<break>`, the only tokens an image follows in every
    layout (documents, prompts, SFT rows). A run opened by anything else gets no cells: in a CM3 training
    sequence that is the rest of an image after a `<mask:i>` or a span appended at the end, whose true cells
    depend on a span length the model cannot know at that point. Cells past the grid (a longer run) get -1.
    """
    B, T = ids.shape
    is_image = ids >= image_offset
    opens = (ids == Vocabulary.eod) | (ids == Vocabulary.break_)
    index = torch.arange(T, device=ids.device).expand(B, T)
    last_other = torch.where(is_image, -1, index).cummax(dim=1).values  # the last non-image position so far
    carry = torch.full((B,), -1, dtype=torch.long, device=ids.device) if carry is None else carry
    opened = opens.gather(1, last_other.clamp(min=0))
    # cell = index - base: a run opened in this call starts after its opener; one carried in continues `carry`
    base = torch.where(last_other >= 0, last_other + 1, -carry[:, None])
    valid = torch.where(last_other >= 0, opened, carry[:, None] >= 0)
    cell = index - base
    cell = torch.where(is_image & valid & (cell < cells), cell, -1)
    last = cell[:, -1]
    next_cell = torch.where(is_image[:, -1], torch.where(last >= 0, last + 1, -1),
                            torch.where(opens[:, -1], 0, -1))
    return cell, next_cell


def causal_kwargs(q_len: int, k_len: int, device: torch.device) -> dict:
    """SDPA masking for queries at the last q_len of k_len positions (`is_causal` alone aligns them top-left)."""
    if q_len == 1:
        return {}  # one new token sees every cached position
    if q_len == k_len:
        return {"is_causal": True}
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)
    return {"attn_mask": mask}


def padded_causal_mask(q_len: int, key_padding: torch.Tensor) -> torch.Tensor:
    """Bool SDPA mask [B, 1, q_len, k_len]: causal, left-padding keys hidden (key_padding [B, k_len], True = pad).

    A pad query still sees itself, so no row is all-masked (that would give NaN, and NaN values in the cache
    would leak into real rows through 0 * NaN)."""
    k_len = key_padding.shape[1]
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=key_padding.device).tril(diagonal=k_len - q_len)
    own = torch.zeros_like(causal)
    own[torch.arange(q_len), torch.arange(k_len - q_len, k_len)] = True
    return (causal & ~key_padding[:, None, None, :]) | own


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight (as Llama and Chameleon do)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class HeadNorm(nn.Module):
    """LayerNorm over each head's channels with a weight and a bias per head ([heads, head_dim]): Chameleon's
    query-key norm, whose affines differ between heads of different model-parallel shards."""

    def __init__(self, heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, heads, T, head_dim]
        normed = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return normed * self.weight[:, None] + self.bias[:, None]


def make_norm(config: CM3Config) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, elementwise_affine=False)


def head_norm(config: CM3Config, heads: int) -> nn.Module | None:
    if not config.qk_norm:
        return None
    if config.qk_norm_affine:
        return HeadNorm(heads, config.head_dim)
    return nn.LayerNorm(config.head_dim, elementwise_affine=False)


class Attention(nn.Module):
    def __init__(self, config: CM3Config, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.head_dim = layer, config.n_heads, config.head_dim
        self.n_kv_heads = config.kv_heads
        kv_width = 2 * self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(config.d_model, config.d_model + kv_width, bias=False)  # queries, keys, values
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.q_norm = head_norm(config, self.n_heads)
        self.k_norm = head_norm(config, self.n_kv_heads)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv_cache: KVCache | None, start_pos: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        heads = (self.n_heads, self.n_kv_heads, self.n_kv_heads)
        q, k, v = (part.view(B, T, h, self.head_dim).transpose(1, 2)
                   for part, h in zip(self.qkv(x).split([h * self.head_dim for h in heads], dim=-1), heads))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, start_pos, k, v)
        masking = {"attn_mask": mask} if mask is not None else causal_kwargs(T, k.shape[2], x.device)
        if self.n_kv_heads != self.n_heads:
            masking["enable_gqa"] = True
        y = F.scaled_dot_product_attention(q, k, v, **masking)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: CM3Config):
        super().__init__()
        hidden = config.mlp_hidden
        self.up = nn.Linear(config.d_model, hidden, bias=False)
        self.gate = nn.Linear(config.d_model, hidden, bias=False) if config.activation == "swiglu" else None
        self.down = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        h = F.relu(h) if self.gate is None else F.silu(self.gate(x)) * h
        return self.down(h)


class Block(nn.Module):
    def __init__(self, config: CM3Config, layer: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.swin_norm = config.swin_norm

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv_cache: KVCache | None, start_pos: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.swin_norm:  # the norms close each branch instead of opening it
            x = x + self.attn_norm(self.attn(x, rope, kv_cache, start_pos, mask))
            return x + self.mlp_norm(self.mlp(x))
        x = x + self.attn(self.attn_norm(x), rope, kv_cache, start_pos, mask)
        return x + self.mlp(self.mlp_norm(x))


class CM3(nn.Module):
    """The decoder. `CM3()` is the paper's 350m model over the default vocabulary (random weights);
    `CM3(config)` any other shape; `CM3.from_pretrained(dir)` a saved or converted checkpoint."""

    loss_kernel = None  # the training loss's per-chunk kernel; `apply_compile` sets a compiled one

    def __init__(self, config: CM3Config | None = None):
        super().__init__()
        config = config or CM3Config.from_preset("350m", vocab_size=DEFAULT_VOCABULARY.size)
        self.config = config
        self._image_source: Path | None = None  # a checkpoint's tokenizer folder, loaded on the first image call
        # bool [vocab]: the only output-head rows that get gradients (cm3.model.train_step.train_image_head_only)
        self.head_rows: torch.Tensor | None = None
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model) if config.positions == "learned" else None
        grid = config.image_grid
        self.row_emb = nn.Embedding(grid, config.d_model) if grid else None
        self.col_emb = nn.Embedding(grid, config.d_model) if grid else None
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        # Tied (metaseq/OPT) by default: logits reuse tok_emb.weight, and the checkpoint holds that matrix once.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """metaseq's "full megatron init": every matrix truncated normal (std, cut at 3 std), positions with
        their own small std, and the layers writing into the residual stream at 0 so each block starts as identity.
        Norm affines (the Chameleon options) start at weight 1, bias 0."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):  # no biases: every one is a matrix
                nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
            elif isinstance(module, (RMSNorm, HeadNorm)):
                nn.init.ones_(module.weight)
                if isinstance(module, HeadNorm):
                    nn.init.zeros_(module.bias)
        if self.pos_emb is not None:
            pos_std = self.config.pos_init_std
            nn.init.trunc_normal_(self.pos_emb.weight, mean=0.0, std=pos_std, a=-3 * pos_std, b=3 * pos_std)
        for block in self.blocks:
            nn.init.zeros_(block.attn.out.weight)
            nn.init.zeros_(block.mlp.down.weight)

    def __setattr__(self, name: str, value) -> None:
        if name == "image_tokenizer":  # the property's, never a submodule: the state dict stays the decoder's
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, ids: torch.Tensor, caption: torch.Tensor | None = None, *, kv_cache: KVCache | None = None,
                start_pos: int = 0, key_padding: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                loss_weights: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T] at positions [start_pos, start_pos + T) -> float32 logits [B, T, vocab].

        `model(images, caption)` (the CM3Leon README's call): images float [B, 3, H, W] in [-1, 1] and caption
        text ids [B, L] are laid out as the paper's caption-first document by `document_ids`, and the logits
        cover that whole document: T = L + 1 + tokens_per_image.

        With `kv_cache`, keys/values of these positions are written to it and earlier ones are read from it.
        `key_padding` [B, start_pos + T] (True = padding) makes left-padding invisible: pads are hidden from
        attention and each row's positions start after its pads, so a padded prompt gives the same logits as
        the prompt alone (generation batches prompts of different lengths this way).

        Training passes `targets` and `loss_weights` [B, T] and gets (sum of loss_weights * cross-entropy,
        per-position cross-entropy) instead, computed chunk by chunk (`linear_cross_entropy`): the [B, T, vocab]
        logits never exist. It is computed inside forward so that FSDP and DDP see the output head's use.
        """
        if ids.is_floating_point():
            if caption is None:
                raise ValueError("model(images, caption): an image batch needs the caption's text ids too")
            ids = self.document_ids(ids, caption)
        elif caption is not None:
            raise ValueError(f"a second argument (caption ids) goes with an image batch [B, 3, H, W] as the first; "
                             f"got ids of dtype {ids.dtype}")
        x = self.hidden(ids, kv_cache=kv_cache, start_pos=start_pos, key_padding=key_padding)
        if targets is not None:
            weights = torch.ones_like(targets, dtype=torch.float32) if loss_weights is None else loss_weights
            return linear_cross_entropy(self.norm(x), self.output_weight(), targets, weights, kernel=self.loss_kernel)
        return self.head(x)

    def hidden(self, ids: torch.Tensor, *, kv_cache: KVCache | None = None, start_pos: int = 0,
               key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` without the output head: the last block's output [B, T, d_model] (prefill takes the head
        of the last position only)."""
        T = ids.shape[1]
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(f"positions up to {start_pos + T} exceed max_seq_len {self.config.max_seq_len}")
        if start_pos and kv_cache is None:
            raise ValueError("start_pos > 0 needs the kv_cache that holds positions [0, start_pos)")
        positions = torch.arange(start_pos, start_pos + T, device=ids.device)
        if key_padding is not None:  # per-row positions counted from the first real token
            positions = (positions[None, :] - key_padding.sum(dim=1, keepdim=True)).clamp(min=0)
        cells = None
        if self.row_emb is not None:
            grid = self.config.image_grid
            carry = kv_cache.next_cell if kv_cache is not None and start_pos > 0 else None
            cells, next_cell = image_cells(ids, self.config.image_offset, grid * grid, carry)
            if kv_cache is not None:
                kv_cache.next_cell = next_cell
        x, rope = self.embed(ids, positions, cells)
        mask = None if key_padding is None else padded_causal_mask(T, key_padding)
        for block in self.blocks:
            x = block(x, rope, kv_cache, start_pos, mask)
        return x

    def embed(self, ids: torch.Tensor, positions: torch.Tensor, cells: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Input of the first block for ids [B, T] at positions [T] or [B, T]: token (+ learned position) (+ grid)
        embeddings, and the RoPE angles the blocks rotate by (None with learned positions). `cells` [B, T] is each
        image token's grid cell (-1: none), required when the model has grid embeddings."""
        x = self.tok_emb(ids)
        if self.row_emb is not None:
            grid = self.config.image_grid
            on_grid = cells >= 0
            cell = cells.clamp(min=0)
            x = x + (self.row_emb(cell // grid) + self.col_emb(cell % grid)) * on_grid[..., None]
        if self.pos_emb is not None:
            return x + self.pos_emb(positions), None
        return x, rope_angles(positions, self.config.head_dim, self.config.rope_theta)

    def output_weight(self) -> torch.Tensor:
        """The output projection [vocab, d_model]: the token embedding when tied. With `head_rows` set, the other
        rows are detached, so only those rows get gradients."""
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        if self.head_rows is not None:
            weight = torch.where(self.head_rows.to(weight.device)[:, None], weight, weight.detach())
        return weight

    def head(self, x: torch.Tensor, vocab: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """Final norm and output projection -> float32 logits over the ids in `vocab` (default: all; a slice or a
        LongTensor of ids), so that decoding inside an image computes only the image-code columns."""
        return F.linear(self.norm(x), self.output_weight()[vocab]).float()

    @property
    def vocabulary(self):
        """The vocabulary the image call lays documents out in: the image tokenizer's (a checkpoint's), else the
        default one, which needs this model's vocab_size to match it."""
        tokenizer = self.__dict__.get("_image_tokenizer")
        if tokenizer is None and self._image_source is not None:
            tokenizer = self.image_tokenizer
        if hasattr(tokenizer, "vocab"):
            return tokenizer.vocab
        if self.config.vocab_size != DEFAULT_VOCABULARY.size:
            raise ValueError(f"this model's vocab_size {self.config.vocab_size} is not the default vocabulary's "
                             f"{DEFAULT_VOCABULARY.size}: set model.image_tokenizer to the checkpoint's tokenizer "
                             "(cm3.model.checkpoint.load_checkpoint returns it)")
        return DEFAULT_VOCABULARY

    @property
    def image_tokenizer(self):
        """What turns images into image ids: a `MultimodalTokenizer` (a checkpoint's) or a bare `VQGAN` (the default
        vocabulary's codes). Default: the checkpoint's tokenizer folder when loaded from one, else a randomly
        initialised VQ-GAN of the paper's shape (256 x 256 -> 32 x 32 codes of 8192)."""
        if self.__dict__.get("_image_tokenizer") is None:
            if self._image_source is not None:
                from cm3.tokenizers.multimodal import MultimodalTokenizer

                tokenizer = MultimodalTokenizer.load(self._image_source)
            else:
                from cm3.tokenizers.vqgan import VQGAN

                tokenizer = VQGAN().for_inference()
            self.__dict__["_image_tokenizer"] = tokenizer
        return self.__dict__["_image_tokenizer"]

    @image_tokenizer.setter
    def image_tokenizer(self, tokenizer) -> None:
        self.__dict__["_image_tokenizer"] = tokenizer

    def document_ids(self, images: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
        """The paper's caption-first documents: caption [B, L] text ids (the text tokenizer's own ids, e.g.
        `TextTokenizer.encode`), then the image tokens of images [B, 3, H, W], joined as `encode_document` joins
        them (cm3: `caption <break> IMG`) -> ids [B, L + 1 + tokens_per_image]."""
        vocab = self.vocabulary
        if images.dim() != 4 or caption.dim() != 2 or images.shape[0] != caption.shape[0]:
            raise ValueError(f"expected images [B, 3, H, W] and caption ids [B, L] with the same B, got "
                             f"{list(images.shape)} and {list(caption.shape)}")
        bad = (caption < 0) | (caption >= vocab.text_vocab_size)
        if bool(bad.any()):
            values = sorted(set(caption[bad].tolist()))
            raise ValueError(f"caption ids must be text ids in [0, {vocab.text_vocab_size}) (the vocabulary's "
                             f"text tokens); {int(bad.sum())} are not: {values[:10]}")
        tokenizer = self.image_tokenizer
        vq = getattr(tokenizer, "vq", tokenizer)
        codes = vq.encode(images.float()).flatten(1).cpu().numpy()
        rows = [vocab.document(vocab.text_ids(text.tolist()), row, "caption_first")
                for text, row in zip(caption.cpu(), codes)]
        return torch.tensor(rows, dtype=torch.long, device=self.tok_emb.weight.device)

    def new_kv_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty cache in this model's dtype and device, for up to max_len (default max_seq_len) positions."""
        c = self.config
        weight = self.tok_emb.weight
        return KVCache(batch, max_len or c.max_seq_len, c.n_layers, c.kv_heads, c.head_dim, weight.dtype, weight.device)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write model.safetensors then config.json, each atomically: a directory with a config.json always holds
        complete weights."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda staged: save_file(tensors, staged, metadata={"format": "pt"}))
        atomic_write(directory / CONFIG_NAME, json.dumps(self.config.to_dict(), indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None, expected_vocab_size: int | None = None) -> CM3:
        """Load a `save_pretrained` directory, or a converted one whose weights are sharded (safetensors only:
        nothing is unpickled). A checkpoint's tokenizer, when it has one, becomes the `image_tokenizer`."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: not a saved CM3 checkpoint (or an unfinished save)")
        config = CM3Config.from_dict(load_json(config_path))
        if expected_vocab_size is not None and config.vocab_size != expected_vocab_size:
            raise ValueError(f"checkpoint {directory} has vocab_size {config.vocab_size} but the vocabulary in use "
                             f"has {expected_vocab_size}; the tokenizer and the model must match")
        with torch.device("meta"):  # no memory and no random init for weights about to be replaced
            model = cls(config)
        model.load_state_dict(load_weights(directory, device), assign=True)
        if (directory / TOKENIZER_DIR).is_dir():
            model._image_source = directory / TOKENIZER_DIR
        return model if dtype is None else model.to(dtype)


def load_weights(directory: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The state dict of model.safetensors, or of every shard that model.safetensors.index.json names."""
    state: dict[str, torch.Tensor] = {}
    for path in check_weights(directory):
        state.update(load_file(path, device=str(device)))
    return state


def check_weights(directory: Path) -> list[Path]:
    """The weight files of a checkpoint folder, each checked whole (header and size) before any is read, so a
    truncated or damaged one is named (InputError) rather than failing inside safetensors or a Ray worker."""
    directory = Path(directory)
    index = directory / WEIGHTS_INDEX_NAME
    if not index.is_file():
        files = [directory / WEIGHTS_NAME]
    else:
        weight_map = load_json(index)
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
            raise InputError(f"{index}: expected a JSON object with a weight_map")
        files = [directory / name for name in sorted(set(map(str, weight_map["weight_map"].values())))]
    for path in files:
        safetensors_header(path)
    return files

