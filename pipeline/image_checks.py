"""Checks on downloaded bytes that img2dataset's resizer does not make, and failure reasons.

OpenCV decodes a truncated JPEG without complaint (the missing rows come out grey), and it
decodes a decompression bomb in full before img2dataset's area check runs. ``GuardedResizer``
looks at the bytes and the header first, so those become counted failures, then hands the
image to img2dataset's own resizer. img2dataset also keeps greyscale images single-channel;
every raw shard image here is 3-channel so the tokenizers see one layout.
"""

from __future__ import annotations

import io
import re

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from cm3.pipeline.url_schemes import REFUSED

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
_PNG_START = b"\x89PNG\r\n\x1a\n"

TRUNCATED = "truncated image"
TOO_LARGE = "image area too large"
_SINGLE_CHANNEL_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def inspect_image_bytes(data: bytes, max_image_area: float) -> tuple[str | None, str | None]:
    """Return (why these bytes must not be decoded or None, the PIL mode read from the header or None)."""
    if data.startswith(_JPEG_START) and not data.rstrip(b"\x00\r\n ").endswith(_JPEG_END):
        return f"{TRUNCATED}: JPEG has no end-of-image marker", None
    if data.startswith(_PNG_START) and b"IEND" not in data[-16:]:
        return f"{TRUNCATED}: PNG has no IEND chunk", None
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            (width, height), mode = header.size, header.mode
    except Image.DecompressionBombError:
        return TOO_LARGE, None
    except (UnidentifiedImageError, OSError, ValueError):
        return None, None  # not for us to judge: OpenCV may still decode it, or will say why not
    if width * height > max_image_area:
        return TOO_LARGE, mode
    return None, mode


def _to_three_channels(encoded: bytes, encode_format: str, encode_params: list[int]) -> bytes:
    image = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
    return cv2.imencode(f".{encode_format}", image, params=encode_params)[1].tobytes()


class GuardedResizer:
    """img2dataset's ``Resizer`` behind ``inspect_image_bytes``; same call signature and return tuple."""

    def __init__(self, resizer, max_image_area: float):
        self.resizer = resizer
        self.max_image_area = max_image_area

    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        problem, mode = inspect_image_bytes(img_stream.read(), self.max_image_area)
        img_stream.seek(0)
        if problem is not None:
            return None, None, None, None, None, problem
        encoded, *sizes, error = self.resizer(img_stream, blurring_bbox_list)
        if encoded is not None and mode in _SINGLE_CHANNEL_MODES:
            encoded = _to_three_channels(encoded, self.resizer.encode_format, self.resizer.encode_params)
        return (encoded, *sizes, error)


_HTTP_STATUS = re.compile(r"HTTP Error (\d{3})")


def failure_reason(error_message: str) -> str:
    """Fold img2dataset's free-text error messages into a few stable reason names for summaries."""
    message = error_message.lower()
    if REFUSED.lower() in message or message.startswith("unknown url type"):  # the latter: urllib, no scheme at all
        return "unsupported_scheme"
    status = _HTTP_STATUS.search(error_message)
    if status:
        return f"http_{status.group(1)}"
    if "timed out" in message or "timeout" in message:
        return "timeout"
    if message.startswith(TRUNCATED):
        return "truncated"
    if message == TOO_LARGE:
        return "image_too_large"
    if "decoding error" in message:
        return "not_an_image"
    if "image too small" in message:
        return "image_too_small"
    if "aspect ratio" in message:
        return "aspect_ratio_too_large"
    if "x-robots-tag" in message:
        return "disallowed_by_robots"
    if "no host given" in message or "invalid url" in message:
        return "invalid_url"
    if "urlopen error" in message or "connection" in message or "remote end closed" in message:
        return "connection_error"
    return "other"
