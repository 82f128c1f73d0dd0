"""The project's one image preprocessing: what every image goes through before the VQ-GAN sees it.

``square_pixels`` centre-crops and resizes exactly as ``cm3 ingest`` does (img2dataset's ``Resizer`` in
``center_crop`` mode: OpenCV, the shorter side scaled to the resolution with area interpolation when shrinking and
Lanczos when enlarging, then the centred square), so an image seen through ingest, an SFT source file,
``cm3 caption`` or the demo's evaluation reaches the tokenizer as the same pixels. The rest converts between those
uint8 pixels and the float [-1, 1] tensors the VQ-GAN takes and returns.
"""

from __future__ import annotations

import io
import os

import cv2
import numpy as np
import torch
from PIL import Image

_TRANSPARENT_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def decode(data: bytes) -> Image.Image:
    """Encoded image bytes as a fully read PIL image (a truncated or corrupt file raises here, not later)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def rgb_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB as ingest sees an image: transparency composited over white (img2dataset's alpha
    matting), greyscale as three equal channels."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image arrays must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
        return image
    if image.mode in _TRANSPARENT_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"))
        alpha = rgba[..., 3:]
        matted = alpha / 255 * rgba[..., :3] + 255 - alpha
        return np.rint(matted.clip(min=0, max=255)).astype(np.uint8)
    return np.asarray(image.convert("RGB"))


def centre_crop_box(width: int, height: int, resolution: int) -> tuple[float, float, float]:
    """(left, top, side) in the source image's pixels of the square that ``square_pixels`` keeps."""
    short = min(width, height)
    scale = resolution / short
    scaled_width, scaled_height = _scaled_size(width, height, resolution)
    return (scaled_width - resolution) // 2 / scale, (scaled_height - resolution) // 2 / scale, short


def square_pixels(image: Image.Image | np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [resolution, resolution, 3]: ``rgb_pixels`` centre-cropped and resized as ``cm3 ingest`` does it."""
    pixels = rgb_pixels(image)
    height, width = pixels.shape[:2]
    if (width, height) == (resolution, resolution):
        return pixels
    size = _scaled_size(width, height, resolution)
    if size != (width, height):
        shrink = min(width, height) > resolution
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return np.ascontiguousarray(pixels[top: top + resolution, left: left + resolution])


def _scaled_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to ``resolution`` (albumentations' ``SmallestMaxSize``)."""
    scale = resolution / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] in [0, 255] -> float in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [..., 3, H, W] in [-1, 1] -> uint8 in [0, 255] (rounded; values outside [-1, 1] clamped)."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] pixels -> the float [..., 3, H, W] tensor in [-1, 1] that the VQ-GAN encodes."""
    return to_float(torch.from_numpy(np.ascontiguousarray(pixels)).movedim(-1, -3))


def to_pil(image: torch.Tensor) -> Image.Image:
    """A float tensor [3, H, W] in [-1, 1] (what the VQ-GAN decodes to) as an RGB picture."""
    return Image.fromarray(to_uint8(image.detach().float().cpu()).permute(1, 2, 0).numpy(), "RGB")


def load_image_tensor(path: str | os.PathLike, resolution: int) -> torch.Tensor:
    """An image file (a path or a binary file object) as the float tensor [1, 3, resolution, resolution] in [-1, 1]
    the VQ-GAN encodes."""
    with Image.open(path) as image:
        return pixels_to_tensor(square_pixels(image, resolution))[None]
