"""CM3Leon's image tokenizer: a VQ-GAN in the taming-transformers ``VQModel`` layout.

The module names mirror taming's so public checkpoints (taming, latent-diffusion, Chameleon)
load key-for-key: ``encoder.*``, ``quant_conv.*``, ``quantize.embedding.weight``,
``post_quant_conv.*``, ``decoder.*``. Images are float in [-1, 1]; codes are a LongTensor grid.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cm3.core.files import atomic_write
from cm3.core.intact import load_json, safetensors_header

WEIGHTS_NAME = "model.safetensors"
NORMS = ("group", "channel")
CONFIG_NAME = "config.json"
IGNORED_PREFIXES = ("loss.",)  # taming keeps its discriminator and LPIPS under loss.*


@dataclass
class VQGANConfig:
    """Architecture of the tokenizer; field names follow taming's ``ddconfig`` plus ``embed_dim``/``n_embed``."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (32,)
    z_channels: int = 256
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = False
    embed_dim: int = 256
    n_embed: int = 8192
    dropout: float = 0.0
    beta: float = 0.25
    legacy_loss: bool = True
    norm_groups: int = 32  # taming always uses 32; fewer lets tiny demo models use < 32 channels
    # "group": taming's GroupNorm, whose statistics span the whole image, so a model trained on crops meets other
    # statistics on whole images (seen: one large shape tinting a whole white background yellow). "channel":
    # LayerNorm over each pixel's channels (same weight/bias keys): only the middle block's attention still
    # looks across the image (docs/tokenizer.md).
    norm: str = "group"
    # Cosine-similarity codebook (ViT-VQGAN): l2-normalised latents and codes for the lookup. Off for taming
    # checkpoints (their codes are not normalised); it keeps a small from-scratch model from collapsing.
    l2_normalize: bool = False
    # Space-to-depth stem: the encoder sees (in_channels * p^2) channels at resolution / p and the decoder's
    # output is pixel-shuffled back, so no convolution runs at full resolution (where taming's trunk spends
    # most of its compute). 1 = taming's layout exactly. ``attn_resolutions`` count in trunk pixels.
    patch_size: int = 1
    # Kernel of the encoder's first and the decoder's last convolution. With a large ``patch_size`` these two
    # carry in_channels * p^2 channels and cost most of the compute at 3; 1 makes them a linear patch
    # embedding as in ViT (the trunk's 3x3 convolutions still see the neighbouring patches).
    stem_kernel: int = 3
    # Finite scalar quantization (Mentzer et al., 2023) instead of a learned codebook: each of the
    # ``embed_dim == len(fsq_levels)`` latent channels is bounded and rounded to one of its levels, and the
    # token is the mixed-radix number of the digits (``n_embed == prod(fsq_levels)``). No codebook to
    # collapse, no codebook or commitment loss. Empty = taming's learned codebook.
    fsq_levels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        self.fsq_levels = tuple(int(level) for level in self.fsq_levels)
        if self.fsq_levels and (math.prod(self.fsq_levels) != self.n_embed or len(self.fsq_levels) != self.embed_dim
                                or min(self.fsq_levels) < 2):
            raise ValueError(f"fsq_levels {list(self.fsq_levels)} need n_embed == their product and embed_dim == "
                             f"their count (got n_embed={self.n_embed}, embed_dim={self.embed_dim}), each >= 2")
        if self.num_res_blocks < 1:
            raise ValueError("num_res_blocks must be at least 1")
        if self.patch_size < 1:
            raise ValueError("patch_size must be at least 1")
        if self.stem_kernel not in (1, 3):
            raise ValueError(f"stem_kernel must be 1 or 3, got {self.stem_kernel}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        widths = {self.ch * m for m in self.ch_mult} | {self.ch}
        if self.norm == "group" and any(w % self.norm_groups for w in widths):
            raise ValueError(f"every width {sorted(widths)} must be divisible by norm_groups={self.norm_groups}")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"resolution {self.resolution} is not a multiple of {self.downsample_factor}")

    @property
    def groups(self) -> int:
        """What the blocks are built with: GroupNorm's group count, or 0 for the per-pixel channel norm."""
        return self.norm_groups if self.norm == "group" else 0

    @property
    def downsample_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.ch_mult) - 1)

    def trunk(self) -> VQGANConfig:
        """The config the encoder/decoder trunk is built from: the patch stem folded into its channels."""
        p = self.patch_size
        return replace(self, in_channels=self.in_channels * p * p, out_ch=self.out_ch * p * p,
                       resolution=self.resolution // p, patch_size=1)

    @property
    def grid_size(self) -> int:
        return self.resolution // self.downsample_factor

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ch_mult"] = list(self.ch_mult)
        data["attn_resolutions"] = list(self.attn_resolutions)
        data["fsq_levels"] = list(self.fsq_levels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VQGANConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VQGANConfig keys: {unknown}")
        return cls(**data)

    @classmethod
    def from_taming(cls, cfg: dict[str, Any]) -> VQGANConfig:
        """Read a taming/latent-diffusion config: top level, ``params`` or ``model.params``."""
        params = cfg
        if "model" in params and isinstance(params["model"], dict):
            params = params["model"]
        if "ddconfig" not in params and isinstance(params.get("params"), dict):
            params = params["params"]
        if "ddconfig" not in params or "n_embed" not in params or "embed_dim" not in params:
            raise ValueError("taming config needs ddconfig, embed_dim and n_embed (top level, params or model.params)")
        dd = params["ddconfig"]
        keys = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution",
                "in_channels", "out_ch", "double_z", "dropout")
        return cls(**{k: dd[k] for k in keys if k in dd}, embed_dim=int(params["embed_dim"]),
                   n_embed=int(params["n_embed"]))

    @classmethod
    def preset(cls, name: str) -> VQGANConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return replace(PRESETS[name])


PRESETS: dict[str, VQGANConfig] = {
    # CM3Leon: 256x256 -> 32x32 = 1024 tokens from 8192 codes.
    "f8-8192": VQGANConfig(),
    # taming's public ImageNet f16 model: 256x256 -> 16x16 = 256 tokens from 1024 codes.
    "f16-1024": VQGANConfig(ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,), n_embed=1024),
    # For the embedded CPU demo: 256x256 -> 8x8 = 64 tokens from 4375 codes. Each token is one 32x32-pixel cell
    # folded into channels and embedded linearly (the demo's shapes lie on that cell grid), a trunk of 3x3
    # convolutions on the 8x8 grid, FSQ levels (7, 5, 5, 5, 5), per-pixel channel norm: 1.2M parameters.
    # Measurements and the presets it replaced: docs/demo.md.
    "demo": VQGANConfig(ch=64, ch_mult=(1,), num_res_blocks=2, attn_resolutions=(), z_channels=64, embed_dim=5,
                        n_embed=4375, norm_groups=8, patch_size=32, stem_kernel=1, fsq_levels=(7, 5, 5, 5, 5),
                        norm="channel"),
}


# --- building blocks (taming names) ---------------------------------------------------------


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each pixel, with GroupNorm's parameter names and shapes."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


def _normalize(channels: int, groups: int) -> nn.Module:
    """GroupNorm with ``groups`` groups (taming), or with 0 the per-pixel ``ChannelNorm``."""
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True) if groups else ChannelNorm(channels)


class ResnetBlock(nn.Module):
    """Two norm-swish-conv layers with a residual; ``nin_shortcut`` (1x1) when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (proj(n).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after taming's asymmetric (0, 1, 0, 1) zero padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, cfg: VQGANConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg.dropout, cfg.groups)
        self.attn_1 = AttnBlock(channels, cfg.groups)
        self.block_2 = ResnetBlock(channels, channels, cfg.dropout, cfg.groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class _Level(nn.Module):
    """One resolution: ``block[j]`` each followed by ``attn[j]`` when this resolution has attention."""

    def __init__(self, widths: list[tuple[int, int]], with_attn: bool, cfg: VQGANConfig):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o, cfg.dropout, cfg.groups) for i, o in widths)
        self.attn = nn.ModuleList(AttnBlock(o, cfg.groups) for _, o in widths if with_attn)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h


def _chain(width: int, out: int, count: int) -> list[tuple[int, int]]:
    return [(width if j == 0 else out, out) for j in range(count)]


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, cfg.stem_kernel, padding=cfg.stem_kernel // 2)
        self.down = nn.ModuleList()
        width, res = cfg.ch, cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            out = cfg.ch * mult
            level = _Level(_chain(width, out, cfg.num_res_blocks), res in cfg.attn_resolutions, cfg)
            width = out
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(width)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(width, cfg)
        self.norm_out = _normalize(width, cfg.groups)
        self.conv_out = nn.Conv2d(width, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Mirror of the encoder; ``up[i]`` is stored by resolution index, so ``up[-1]`` runs first."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        width = cfg.ch * cfg.ch_mult[-1]
        res = cfg.grid_size
        self.conv_in = nn.Conv2d(cfg.z_channels, width, 3, padding=1)
        self.mid = _Mid(width, cfg)
        levels: list[_Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            out = cfg.ch * cfg.ch_mult[i]
            level = _Level(_chain(width, out, cfg.num_res_blocks + 1), res in cfg.attn_resolutions, cfg)
            width = out
            if i != 0:
                level.upsample = Upsample(width)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _normalize(width, cfg.groups)
        self.conv_out = nn.Conv2d(width, cfg.out_ch, cfg.stem_kernel, padding=cfg.stem_kernel // 2)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight taming's adaptive GAN weight differentiates against."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with taming's ``VectorQuantizer2`` loss and a straight-through gradient.

    legacy: commitment weight 1 and codebook weight ``beta`` (what released checkpoints used);
    otherwise the usual ``beta`` on the commitment term.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float, legacy: bool, l2_normalize: bool = False):
        super().__init__()
        self.beta = beta
        self.legacy = legacy
        self.l2_normalize = l2_normalize
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def codes(self) -> torch.Tensor:
        """The code vectors [n_embed, D] as the lookup uses them (unit length with ``l2_normalize``)."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=1) if self.l2_normalize else weight

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Code index per position of ``z`` [B, C, H, W], computed in float32 for determinism."""
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codes = self.codes().float()
        if self.l2_normalize:  # cosine similarity
            dist = -(F.normalize(flat, dim=1) @ codes.t())
        else:
            dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.t()
        return dist.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors [B, C, H, W] for an index grid [B, H, W]."""
        return F.embedding(indices, self.codes()).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = z.float()
        if self.l2_normalize:
            z = F.normalize(z, dim=1)
        indices = self.nearest(z)
        z_q = self.lookup(indices)
        commitment = F.mse_loss(z, z_q.detach())
        codebook = F.mse_loss(z_q, z.detach())
        loss = commitment + self.beta * codebook if self.legacy else self.beta * commitment + codebook
        return z + (z_q - z).detach(), loss, indices


class FiniteScalarQuantizer(nn.Module):
    """FSQ: bound each channel with tanh, round it to one of ``levels[i]`` values (straight-through), and
    number the resulting grid point in mixed radix. Same interface as ``VectorQuantizer``; no parameters."""

    def __init__(self, levels: tuple[int, ...]):
        super().__init__()
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        basis = torch.cumprod(torch.tensor((1, *levels[:-1]), dtype=torch.long), 0)
        self.register_buffer("basis", basis, persistent=False)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        """Channels-last z [..., D] -> values in (-(L-1)/2, (L-1)/2), shifted so even L rounds to L values."""
        levels = self.levels.to(z.dtype)
        half = (levels - 1) * (1 + 1e-3) / 2
        offset = (self.levels % 2 == 0).to(z.dtype) * 0.5
        return torch.tanh(z + torch.atanh(offset / half)) * half - offset

    def _digits(self, bounded: torch.Tensor) -> torch.Tensor:
        """Bounded channels-last latents [..., D] -> integer digits [..., D] in [0, L)."""
        return torch.round(bounded).long() + self.levels // 2

    def _values(self, digits: torch.Tensor) -> torch.Tensor:
        """Digits [..., D] -> code values in [-1, 1]."""
        half = (self.levels // 2).to(torch.float32)
        return (digits.float() - half) / half

    def codes(self) -> torch.Tensor:
        indices = torch.arange(int(torch.prod(self.levels)), device=self.levels.device)
        return self._values((indices[:, None] // self.basis) % self.levels)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        return (self._digits(self._bound(z.float().permute(0, 2, 3, 1))) * self.basis).sum(-1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices[..., None] // self.basis) % self.levels
        return self._values(digits).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bounded = self._bound(z.float().permute(0, 2, 3, 1))
        rounded = bounded + (torch.round(bounded) - bounded).detach()  # straight-through
        half = (self.levels // 2).to(torch.float32)
        z_q = (rounded / half).permute(0, 3, 1, 2).contiguous()
        indices = (self._digits(bounded) * self.basis).sum(-1)
        return z_q, z.new_zeros((), dtype=torch.float32), indices


# --- the model --------------------------------------------------------------------------------


class VQGAN(nn.Module):
    """Encoder -> quant_conv -> VectorQuantizer -> post_quant_conv -> decoder."""

    def __init__(self, config: VQGANConfig | None = None):
        super().__init__()
        self.config = config or VQGANConfig()
        cfg = self.config
        self.encoder = Encoder(cfg.trunk())
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.quant_conv = nn.Conv2d(z_out, cfg.embed_dim, 1)
        self.quantize = FiniteScalarQuantizer(cfg.fsq_levels) if cfg.fsq_levels else \
            VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.legacy_loss, cfg.l2_normalize)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg.trunk())

    # training path

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latents [B, embed_dim, h, w] (used for dead-code restarts)."""
        if self.config.patch_size > 1:
            images = F.pixel_unshuffle(images, self.config.patch_size)
        return self.quant_conv(self.encoder(images))

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.post_quant_conv(z_q))
        return F.pixel_shuffle(out, self.config.patch_size) if self.config.patch_size > 1 else out

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, codebook_loss, indices) with gradients, for training."""
        z_q, loss, indices = self.quantize(self.encode_latent(images))
        return self.decode_latent(z_q), loss, indices

    # inference path

    def for_inference(self, device: str | torch.device = "cpu", compile: bool = False) -> VQGAN:
        """Move to `device` in eval mode for batched `encode`/`decode`. `compile=True` torch.compiles both paths
        (a one-off compile per batch shape), fusing the GroupNorm + SiLU pairs that dominate the full-resolution
        layers; on GPUs the weights go channels-last too (docs/benchmarks.md has the figures)."""
        self.to(device).eval()
        if compile and torch.device(device).type == "cuda":
            self.to(memory_format=torch.channels_last)
        # Plain attributes, not submodules: the state dict keeps taming's key names.
        self._encode_fn = torch.compile(self._encode_codes, dynamic=False) if compile else self._encode_codes
        self._decode_fn = torch.compile(self._decode_codes, dynamic=False) if compile else self._decode_codes
        return self

    def _encode_codes(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantize.nearest(self.encode_latent(images))

    def _decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode_latent(self.quantize.lookup(codes))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> codes LongTensor [B, H/f, W/f]."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images [B, {self.config.in_channels}, H, W], got {list(images.shape)}")
        return self._batched(images, batch_size, getattr(self, "_encode_fn", self._encode_codes))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Codes LongTensor [B, h, w] -> images [B, 3, h*f, w*f] clamped to [-1, 1]."""
        if codes.ndim != 3:
            raise ValueError(f"expected codes [B, h, w], got {list(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.n_embed):
            raise ValueError(f"codes must lie in [0, {self.config.n_embed})")
        out = self._batched(codes.long(), batch_size, getattr(self, "_decode_fn", self._decode_codes))
        return out.float().clamp_(-1.0, 1.0)

    def _batched(self, x: torch.Tensor, batch_size: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        device = next(self.parameters()).device
        cuda = device.type == "cuda"
        outputs = []
        for chunk in x.split(batch_size):
            chunk = chunk.to(device, non_blocking=True)
            if cuda and chunk.is_floating_point():
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
            with autocast:
                out = fn(chunk)
            outputs.append(out.float() if out.is_floating_point() else out)
        return torch.cat(outputs)

    # persistence

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write model.safetensors + config.json, each atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda staged: save_file(state, staged, metadata={"format": "pt"}))
        atomic_write(directory / CONFIG_NAME, json.dumps(self.config.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> VQGAN:
        from safetensors.torch import load_file

        directory = Path(directory)
        config = VQGANConfig.from_dict(load_json(directory / CONFIG_NAME))
        safetensors_header(directory / WEIGHTS_NAME)  # a truncated file is named, not a safetensors traceback
        model = cls(config)
        model.load_checked(load_file(str(directory / WEIGHTS_NAME)))
        return model.for_inference(device)

    @classmethod
    def from_taming(cls, checkpoint_path: str | os.PathLike[str],
                    config: dict[str, Any] | str | os.PathLike[str] | VQGANConfig) -> VQGAN:
        """Load a taming/latent-diffusion/Chameleon VQModel checkpoint (.ckpt, .pt/.pth or .safetensors)."""
        if isinstance(config, VQGANConfig):
            cfg = config
        else:
            if not isinstance(config, dict):
                import yaml

                config = yaml.safe_load(Path(config).read_text())
            cfg = VQGANConfig.from_taming(config)
        model = cls(cfg)
        state = {k: v for k, v in read_state_dict(checkpoint_path).items() if not k.startswith(IGNORED_PREFIXES)}
        model.load_checked(state)
        return model.eval()

    def load_checked(self, state: dict[str, torch.Tensor]) -> None:
        """Strict load: any missing/unexpected key or shape mismatch raises ValueError naming it."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the config: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
        for key, value in state.items():
            if value.shape != own[key].shape:
                raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, "
                                 f"model {tuple(own[key].shape)}")
        self.load_state_dict(state, strict=True)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, never unpickling code: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        safetensors_header(path)  # a truncated file is named, not a safetensors traceback
        return load_file(str(path))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses pickled classes; say so instead of unpickling them
        raise ValueError(f"{path} could not be read as a tensors-only checkpoint: {err}") from err
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    return data


def codebook_usage(codes: torch.Tensor, n_embed: int) -> float:
    """Fraction of the codebook that appears at least once in ``codes``."""
    return torch.unique(codes).numel() / n_embed
