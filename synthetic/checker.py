"""Read the attributes of a demo image back from its pixels.

Used to score *generated* images against their captions, so every step is a robust
statistic (medians, nearest palette entry, the largest connected component) that survives
JPEG artefacts, blur and noise rather than an exact comparison with ``render``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from .shapes import (
    BACKGROUNDS,
    CANVAS,
    COLOURS,
    POSITIONS,
    SIZE_DIAMETERS,
    SIZES,
    ShapeSpec,
    axis_centres,
)

BORDER = 3  # width in pixels of the frame whose median is the background colour
FOREGROUND_DISTANCE = 50.0  # first pass: RGB distance from the background that counts as shape
MIN_AREA_FRACTION = 0.002  # smaller components are noise, not a shape (~130 px at 256x256)
# Taper (area in the top quarter of the bounding box / area in its bottom quarter): the apex-up triangle
# 1/7, circle and square 1. Blur hardly moves it (sigma 6 px: a 4x4-cell triangle's <= 0.45) while it fills
# such a triangle's box to ~0.7, as much as a circle's, so triangles are told by taper, not fill ratio.
TRIANGLE_TAPER_BELOW = 0.5
ROUND_TAPER_ABOVE = 2.0  # a circle or square wider at the top than this is neither
# Fill ratio (area / bounding-box area): circle pi/4 = 0.785, square 1.0. Under CIRCLE_FILL_ABOVE a blob
# that does not taper like a triangle is no shape at all (generated blobs filled 0.38-0.61 of their box).
CIRCLE_FILL_ABOVE = 0.68
ASPECT_AT_MOST = 1.5  # every shape of the data set fits a square box; a bar or a smear is none of them
SQUARE_ABOVE = (np.pi / 4 + 1.0) / 2  # ~0.893
# Bounding-box extent thresholds midway between the nominal diameters.
SIZE_THRESHOLDS = tuple((SIZE_DIAMETERS[a] + SIZE_DIAMETERS[b]) / 2 for a, b in zip(SIZES, SIZES[1:]))

_KERNEL = np.ones((3, 3), np.uint8)


@dataclass(frozen=True)
class Reading:
    """What the checker saw; attribute names are ``None`` when no shape was found (``shape`` also when the
    blob found is none of the three shapes)."""

    ok: bool
    background: str
    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None
    foreground_fraction: float = 0.0
    fill_ratio: float = 0.0
    taper: float = 0.0  # top-quarter area / bottom-quarter area of the bounding box
    colour_distance: float = float("nan")  # from the measured colour to the named palette colour
    extent: float = 0.0  # mean bounding-box side, CANVAS pixels
    centre: tuple[float, float] = (float("nan"), float("nan"))  # bounding-box centre


def _nearest(palette: Mapping[str, tuple[int, int, int]], rgb: np.ndarray) -> tuple[str, float]:
    name = min(palette, key=lambda k: float(np.linalg.norm(rgb - palette[k])))
    return name, float(np.linalg.norm(rgb - palette[name]))


def _as_canvas(image: Image.Image | np.ndarray) -> np.ndarray:
    """HxWx3 float32 RGB at CANVAS x CANVAS."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB array, got shape {array.shape}")
    if array.shape[:2] != (CANVAS, CANVAS):
        array = cv2.resize(array, (CANVAS, CANVAS), interpolation=cv2.INTER_AREA)
    return array.astype(np.float32)


def _largest_component(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(component mask, stats row [x, y, w, h, area]) of the biggest blob after an opening."""
    opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, _KERNEL)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if count < 2:
        return None
    label = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[label, cv2.CC_STAT_AREA] < MIN_AREA_FRACTION * mask.size:
        return None
    return labels == label, stats[label]


def _classify_position(cx: float, cy: float, size: str) -> str:
    """The nearest of the nominal positions of a shape of this size."""
    centres = np.array(axis_centres(size))
    col = int(np.argmin(np.abs(centres - cx)))
    row = int(np.argmin(np.abs(centres - cy)))
    return POSITIONS[3 * row + col]


def _taper(component: np.ndarray, x: int, y: int, w: int, h: int) -> float:
    """Area in the top quarter of the bounding box over area in its bottom quarter."""
    box = component[y : y + h, x : x + w]
    quarter = max(1, h // 4)
    return float(box[:quarter].sum()) / max(float(box[-quarter:].sum()), 1.0)


def _classify_shape(fill_ratio: float, taper: float, aspect: float) -> str | None:
    """Triangle by its taper, square or circle by how much of its box it fills; None for none of these."""
    if aspect > ASPECT_AT_MOST:
        return None
    if taper < TRIANGLE_TAPER_BELOW:
        return "triangle"
    if taper > ROUND_TAPER_ABOVE or fill_ratio < CIRCLE_FILL_ABOVE:
        return None
    return "square" if fill_ratio > SQUARE_ABOVE else "circle"


def _classify_size(extent: float) -> str:
    return SIZES[int(np.searchsorted(SIZE_THRESHOLDS, extent))]


def read_attributes(image: Image.Image | np.ndarray) -> Reading:
    """Background, colour, shape, size and position of the single shape in ``image``.

    Two passes: a loose distance threshold finds the shape and its colour; then each pixel's
    coverage (its projection on the background->colour line) is thresholded at one half, so
    anti-aliased and blurred edges land where the true edge is.
    """
    rgb = _as_canvas(image)
    edges = (rgb[:BORDER], rgb[-BORDER:], rgb[:, :BORDER], rgb[:, -BORDER:])
    frame = np.concatenate([edge.reshape(-1, 3) for edge in edges])
    bg_rgb = np.median(frame, axis=0)
    background, _ = _nearest(BACKGROUNDS, bg_rgb)

    rough = _largest_component(np.linalg.norm(rgb - bg_rgb, axis=2) > FOREGROUND_DISTANCE)
    if rough is None:
        return Reading(ok=False, background=background)
    core = cv2.erode(rough[0].astype(np.uint8), _KERNEL, iterations=2).astype(bool)
    fg_rgb = np.median(rgb[core if core.any() else rough[0]], axis=0)
    colour, colour_distance = _nearest(COLOURS, fg_rgb)

    direction = fg_rgb - bg_rgb
    coverage = (rgb - bg_rgb) @ direction / max(float(direction @ direction), 1e-6)
    fine = _largest_component(coverage > 0.5)
    if fine is None:
        return Reading(ok=False, background=background)
    x, y, w, h, area = (int(v) for v in fine[1])
    fill_ratio = area / (w * h)
    taper = _taper(fine[0], x, y, w, h)
    extent = (w + h) / 2
    cx, cy = x + w / 2, y + h / 2
    size = _classify_size(extent)
    return Reading(
        ok=True,
        background=background,
        colour=colour,
        shape=_classify_shape(fill_ratio, taper, max(w, h) / min(w, h)),
        size=size,
        position=_classify_position(cx, cy, size),
        foreground_fraction=area / (CANVAS * CANVAS),
        fill_ratio=fill_ratio,
        taper=taper,
        colour_distance=colour_distance,
        extent=extent,
        centre=(cx, cy),
    )


def score(image: Image.Image | np.ndarray, expected: ShapeSpec | Mapping[str, str]) -> dict[str, bool]:
    """Which of the expected attributes the image shows (``expected``: a spec or a name mapping)."""
    want = (
        {k: getattr(expected, k) for k in ("colour", "shape", "size", "position", "background")}
        if isinstance(expected, ShapeSpec)
        else expected
    )
    reading = read_attributes(image)
    return {
        f"{key}_ok": reading.ok and getattr(reading, key) == want[key]
        for key in ("colour", "shape", "size", "position")
    } | {"background_ok": reading.background == want["background"]}
