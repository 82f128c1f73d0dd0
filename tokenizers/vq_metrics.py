"""How well the VQ-GAN reconstructs: PSNR, SSIM, codebook usage, and the picture of originals over reconstructions."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from cm3.core.images import to_float, to_uint8
from cm3.tokenizers.vqgan import VQGAN, codebook_usage


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on the [0, 255] scale of images in [-1, 1]; inf for identical images."""
    mse = ((a.float() - b.float()) * 127.5).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 gaussian window, sigma 1.5, K1 .01, K2 .03) on [0, 255]."""
    x, y = (t.float().add(1).mul(127.5) for t in (a, b))
    channels = x.shape[1]
    coords = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def evaluate(model: VQGAN, images: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """Round-trip images (float [-1, 1] or uint8) through the tokenizer; mean PSNR/SSIM and code usage."""
    if images.dtype == torch.uint8:
        images = to_float(images)
    was_training = model.training
    model.eval()
    codes = model.encode(images, batch_size=batch_size)
    recon = model.decode(codes, batch_size=batch_size).cpu()
    model.train(was_training)
    # score the 8-bit images a user would see
    recon = to_float(to_uint8(recon))
    return {
        "psnr": float(psnr(images, recon).mean()),
        "ssim": float(ssim(images, recon).mean()),
        "codebook_usage": codebook_usage(codes, model.config.n_embed),
    }


def write_reconstructions(model: VQGAN, images: torch.Tensor, path: Path) -> None:
    """A PNG grid: originals on the top row, their reconstructions below."""
    recon = to_uint8(model.decode(model.encode(to_float(images))).cpu())
    grid = torch.cat([torch.cat(list(images), dim=2), torch.cat(list(recon), dim=2)], dim=1)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
