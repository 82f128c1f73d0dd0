"""The VQ-GAN's training losses beyond reconstruction (taming's recipe): an LPIPS-style perceptual distance, the
PatchGAN discriminator with its hinge loss, and the adaptive weight that balances the GAN term."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cm3.tokenizers.vqgan import read_state_dict


class LPIPS(nn.Module):
    """LPIPS-style distance: unit-normalised VGG16 features, squared differences, 1x1 linear heads.

    Weights come from one local file (safetensors or tensors-only torch file) holding torchvision
    VGG16 ``features.*`` keys and heads ``lin0..lin4.model.1.weight`` ([1, C, 1, 1], LPIPS's layout).
    """

    TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    WIDTHS = (64, 128, 256, 512, 512)

    def __init__(self, weights_path: str | os.PathLike[str]):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights file not found: {path} (nothing is downloaded; "
                                    "pass lpips_weights=None to train without the perceptual loss)")
        state = read_state_dict(path)
        self.features = make_layers(cfgs["D"])[: self.TAPS[-1] + 1]  # vgg16().features without the classifier
        self.heads = nn.ParameterList(nn.Parameter(torch.empty(1, w, 1, 1)) for w in self.WIDTHS)
        wanted = {f"features.{k}": v for k, v in self.features.state_dict().items()}
        wanted |= {f"lin{i}.model.1.weight": h for i, h in enumerate(self.heads)}
        missing = sorted(k for k in wanted if k not in state)
        if missing:
            raise ValueError(f"{path} lacks LPIPS weights: {missing}")
        with torch.no_grad():
            for key, target in wanted.items():
                if state[key].shape != target.shape:
                    raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, "
                                     f"expected {tuple(target.shape)}")
                target.copy_(state[key])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance per image [B] between images in [-1, 1]."""
        h = torch.cat([a, b]).sub(self.shift).div(self.scale)
        total = a.new_zeros(a.shape[0])
        taps = iter(zip(self.TAPS, self.heads))
        tap, head = next(taps)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == tap:
                fa, fb = (f / (f.norm(dim=1, keepdim=True) + 1e-10) for f in h.chunk(2))
                total = total + F.conv2d((fa - fb) ** 2, head).mean((1, 2, 3))
                tap, head = next(taps, (None, None))
        return total


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): stride-2 4x4 convs with BatchNorm and LeakyReLU, one logit per patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            width = out
        seq.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Taming's GAN weight: balance the two losses' gradient norms at the decoder's last layer."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
