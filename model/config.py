"""The decoder's shape and its training constants in one small dataclass, plus the paper's presets.

Sizes, learning rates, warm-up, batch and tokens seen are the CM3Leon paper's; heads, activation, AdamW betas,
weight decay and the linear decay to 10% are OPT/metaseq defaults the paper does not state.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from cm3.tokenizers.vocabulary import DEFAULT_VOCAB_SIZE  # presets' vocab_size; pass the real `Vocabulary.size`

ACTIVATIONS = ("relu", "swiglu")
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")


@dataclass
class CM3Config:
    vocab_size: int
    n_layers: int
    d_model: int
    n_heads: int
    max_seq_len: int = 4096
    mlp_ratio: int = 4
    activation: str = "relu"  # OPT's; "swiglu" (Llama/Chameleon) keeps the parameter count with a 2/3 hidden size
    qk_norm: bool = False  # parameter-free LayerNorm on queries and keys per head (Chameleon: needed at scale)
    positions: str = "learned"  # paper: learned absolute; "rope" rotates queries and keys instead
    rope_theta: float = 10_000.0
    # Options that make a converted Chameleon/Anole checkpoint exact (all off by default, the paper's decoder):
    norm: str = "layernorm"  # parameter-free LayerNorm (metaseq); "rmsnorm" has a weight (Llama/Chameleon)
    norm_eps: float = 1e-5
    n_kv_heads: int = 0  # grouped-query attention: key/value heads shared by n_heads / n_kv_heads queries; 0 = n_heads
    qk_norm_affine: bool = False  # qk_norm with a weight and a bias per head and channel (Chameleon's, per shard)
    swin_norm: bool = False  # Chameleon-30B's block order: x + norm(attn(x)), then x + norm(mlp(x))
    mlp_hidden_size: int = 0  # the MLP's hidden width as given (Chameleon: 11,008 at 7B); 0 = derived from mlp_ratio
    # DALL-E's row and column embeddings on image tokens: the side of the VQ grid (8 for 8x8 = 64 tokens), 0 off.
    # Image ids are [image_offset, vocab_size) (the joint vocabulary puts them last); training fills it in.
    image_grid: int = 0
    image_offset: int = 0
    init_std: float = 0.006  # truncated normal cut at 3 std; out-projections start at 0
    pos_init_std: float = 0.0002
    # metaseq/OPT share input and output embeddings; only then do the presets' sizes match their names
    # (350m: 373M tied vs 440M untied at vocab 65,536). Set False for Chameleon-style untied heads.
    tie_embeddings: bool = True
    # Optimisation and schedule: AdamW, linear warm-up then linear decay to lr * min_lr_ratio at train_tokens.
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 1500
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    batch_tokens: int = 8 * 2**20
    train_tokens: int = 1_400_000_000_000

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "max_seq_len", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        for name in ("n_kv_heads", "mlp_hidden_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0: derived), got {value!r}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.qk_norm_affine and not self.qk_norm:
            raise ValueError("qk_norm_affine needs qk_norm")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")
        if self.image_grid < 0 or (self.image_grid and not 0 < self.image_offset < self.vocab_size):
            raise ValueError(f"image_grid {self.image_grid} needs image_offset in (0, vocab_size {self.vocab_size}), "
                             f"the first image id; got {self.image_offset}")
        self.betas = tuple(self.betas)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def mlp_hidden(self) -> int:
        """mlp_hidden_size when given; else ReLU: mlp_ratio * d, and SwiGLU, whose three matrices would make that
        larger, 2/3 of it (rounded up to 8) to keep the same size."""
        if self.mlp_hidden_size:
            return self.mlp_hidden_size
        hidden = self.mlp_ratio * self.d_model
        return hidden if self.activation == "relu" else 8 * math.ceil(2 * hidden / 3 / 8)

    @classmethod
    def from_preset(cls, name: str, vocab_size: int = DEFAULT_VOCAB_SIZE, **overrides: Any) -> CM3Config:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], "vocab_size": vocab_size, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CM3Config:
        names = [f.name for f in fields(cls)]
        if unknown := sorted(set(data) - set(names)):
            raise ValueError(f"unknown config field(s) {unknown}; known: {names}")
        return cls(**data)


PRESETS: dict[str, dict[str, Any]] = {
    # Trains in minutes on a CPU: for the demo and for tests.
    "tiny": dict(n_layers=4, d_model=256, n_heads=4, max_seq_len=512, lr=1e-3, warmup_steps=100,
                 batch_tokens=16 * 512, train_tokens=50_000_000),
    "350m": dict(n_layers=24, d_model=1024, n_heads=16, lr=6e-4, train_tokens=1_400_000_000_000),
    "760m": dict(n_layers=24, d_model=1536, n_heads=24, lr=5e-4, train_tokens=1_900_000_000_000),
    "7b": dict(n_layers=32, d_model=4096, n_heads=32, lr=1.2e-4, train_tokens=2_400_000_000_000),
}


def num_parameters(config: CM3Config, include_embeddings: bool = True) -> int:
    """Analytic parameter count; "embeddings" are the token and position tables and an untied output projection."""
    d = config.d_model
    mlp = (2 if config.activation == "relu" else 3) * d * config.mlp_hidden
    attention = 2 * d * d + 2 * d * config.kv_heads * config.head_dim
    qk_norms = 2 * (config.n_heads + config.kv_heads) * config.head_dim if config.qk_norm_affine else 0
    norms = 2 * d if config.norm == "rmsnorm" else 0
    blocks = config.n_layers * (attention + mlp + qk_norms + norms)
    if not include_embeddings:
        return blocks
    positions = (config.max_seq_len * d if config.positions == "learned" else 0) + 2 * config.image_grid * d
    output = 0 if config.tie_embeddings else config.vocab_size * d
    final_norm = d if config.norm == "rmsnorm" else 0
    return blocks + config.vocab_size * d + positions + output + final_norm
