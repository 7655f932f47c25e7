"""Draw grounding results: the request's images tiled left to right, each with its boxes."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from .grounding import Box

COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
TILE_HEIGHT = 384
GAP = 8


def draw_boxes(images: Sequence[Image.Image], boxes: Sequence[Box], out_path: str | Path) -> Path:
    """Write a PNG of the images scaled to one height, side by side, boxes drawn in original-pixel terms."""
    scales = [TILE_HEIGHT / image.height for image in images]
    widths = [max(1, round(image.width * scale)) for image, scale in zip(images, scales)]
    canvas = Image.new("RGB", (sum(widths) + GAP * (len(images) - 1), TILE_HEIGHT), "white")
    offsets, x = [], 0
    for image, width in zip(images, widths):
        canvas.paste(image.convert("RGB").resize((width, TILE_HEIGHT)), (x, 0))
        offsets.append(x)
        x += width + GAP
    pen = ImageDraw.Draw(canvas)
    for number, box in enumerate(boxes):
        scale, left = scales[box.image], offsets[box.image]
        corners = [left + box.x1 * scale, box.y1 * scale, left + box.x2 * scale, box.y2 * scale]
        colour = COLOURS[number % len(COLOURS)]
        pen.rectangle(corners, outline=colour, width=3)
        if box.label:
            pen.text((corners[0] + 3, corners[1] + 2), box.label, fill=colour)
    out = Path(out_path)
    canvas.save(out)
    return out
