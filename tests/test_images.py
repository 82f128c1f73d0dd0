"""The one image preprocessing (cm3.core.images): the pixels of cm3 ingest's resize, and the [-1, 1] tensors."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cm3.core.images import (centre_crop_box, decode, load_image_tensor, pixels_to_tensor, rgb_pixels, square_pixels,
                             to_pil, to_uint8)

RESOLUTION = 32
SIZES = [(300, 200), (100, 61), (32, 32), (33, 1000), (20, 20), (45, 32)]  # shrink, enlarge, as is, tall, odd
MODES = ["RGB", "L", "RGBA", "LA", "P", "P+transparency"]


def encoded(width: int, height: int, mode: str, fmt: str, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    extra = {}
    if mode in ("L", "LA"):
        image = image.convert("L")
    if mode in ("RGBA", "LA"):
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
    if mode.startswith("P"):
        image = image.convert("P")
        extra = {"transparency": 3} if mode == "P+transparency" else {}
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **extra)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def img2dataset_resizer():
    """cm3 ingest's resizer, set as ingest sets it, but writing lossless PNG so its pixels can be compared."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.resizer import Resizer

    return Resizer(image_size=RESOLUTION, resize_mode="center_crop", resize_only_if_bigger=False,
                   encode_format="png", encode_quality=1)


def resized_by_img2dataset(resizer, data: bytes) -> np.ndarray:
    out, *_, error = resizer(io.BytesIO(data))
    assert error is None, error
    return np.asarray(Image.open(io.BytesIO(out)).convert("RGB"))  # ingest stores greyscale as 3 channels too


@pytest.mark.parametrize("mode", MODES)
def test_square_pixels_are_the_pixels_of_ingests_resize(img2dataset_resizer, mode):
    for width, height in SIZES:
        data = encoded(width, height, mode, "PNG")
        ours = square_pixels(decode(data), RESOLUTION)
        assert ours.shape == (RESOLUTION, RESOLUTION, 3) and ours.dtype == np.uint8
        assert np.array_equal(ours, resized_by_img2dataset(img2dataset_resizer, data)), (width, height, mode)


def test_jpeg_sources_decode_and_resize_to_ingests_pixels(img2dataset_resizer):
    for width, height in SIZES:
        for mode in ("RGB", "L"):
            data = encoded(width, height, mode, "JPEG", seed=1)
            assert np.array_equal(square_pixels(decode(data), RESOLUTION),
                                  resized_by_img2dataset(img2dataset_resizer, data)), (width, height, mode)


@pytest.mark.parametrize("width, height, edge", [(100, 11, 50), (64, 48, 30), (640, 427, 300)])
def test_centre_crop_box_is_the_square_that_square_pixels_keeps(width, height, edge):
    """A white-to-black step at source column ``edge`` lands where the box says it does (to a tenth of a pixel)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :edge] = 255
    row = square_pixels(pixels, RESOLUTION)[RESOLUTION // 2, :, 0].astype(float)
    i = int(np.flatnonzero((row[:-1] >= 127.5) & (row[1:] < 127.5))[0])
    crossing = i + 0.5 + (row[i] - 127.5) / (row[i] - row[i + 1])  # in output pixels, from the left edge
    left, top, side = centre_crop_box(width, height, RESOLUTION)
    assert top == 0 and side == height
    assert crossing == pytest.approx((edge - left) * RESOLUTION / side, abs=0.1)
    assert centre_crop_box(RESOLUTION, RESOLUTION, RESOLUTION) == (0, 0, RESOLUTION)


def test_tensors_round_trip_to_the_same_pixels(tmp_path):
    pixels = square_pixels(decode(encoded(50, 40, "RGB", "PNG")), RESOLUTION)
    tensor = pixels_to_tensor(pixels)
    assert tensor.shape == (3, RESOLUTION, RESOLUTION) and tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(to_uint8(tensor).permute(1, 2, 0).numpy(), pixels)
    assert np.array_equal(np.asarray(to_pil(tensor)), pixels)
    assert pixels_to_tensor(np.stack([pixels, pixels])).shape == (2, 3, RESOLUTION, RESOLUTION)
    path = tmp_path / "photo.png"
    path.write_bytes(encoded(50, 40, "RGB", "PNG"))
    assert torch.equal(load_image_tensor(path, RESOLUTION), tensor[None])


def test_rgb_pixels_mattes_transparency_over_white_and_refuses_other_arrays():
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert (rgb_pixels(clear) == 255).all()  # fully transparent red is white, as img2dataset mattes it
    with pytest.raises(ValueError, match="uint8"):
        rgb_pixels(np.zeros((4, 4), np.uint8))
