"""Pictures for people: captioned image grids that reports and commands write as PNG."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def image_grid(images: Sequence[Image.Image], captions: Sequence[str] | None = None, cols: int = 4,
               cell: int = 192, caption_lines: int = 3) -> Image.Image:
    """Tile images into a grid, each with its caption wrapped underneath."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    font = ImageFont.load_default()
    line_height = 12
    text_height = line_height * caption_lines + 6 if captions else 0
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_height)), "white")
    draw = ImageDraw.Draw(sheet)
    chars_per_line = max(8, cell // 6)
    for i, image in enumerate(images):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_height)
        sheet.paste(image.convert("RGB").resize((cell, cell)), (x, y))
        if captions:
            lines = textwrap.wrap(captions[i], chars_per_line)[:caption_lines]
            for j, line in enumerate(lines):
                draw.text((x + 3, y + cell + 3 + j * line_height), line, fill="black", font=font)
    return sheet
