"""Heatmaps drawn over their images, with a caption, and a grid of such overlays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFilter, ImageFont

HEAT_OPACITY = 0.5  # of the colour map over the image, where the map is at its peak
CAPTION_CHARACTERS = 44  # a caption line this long spans the image's width, about
CAPTION_PADDING = 4
THUMBNAIL_WIDTH = 320  # of each overlay in the grid


def overlay(
    image: Image.Image,
    heatmap: np.ndarray,
    caption: Sequence[str],
    lesion: np.ndarray | None = None,
) -> Image.Image:
    """`image` with `heatmap` (its size, any nonnegative scale) in the jet colour map, the
    lesion's outline in white where a mask is given, and `caption` lines below it."""
    peak = float(heatmap.max())
    scaled = heatmap / peak if peak > 0 else heatmap
    colours = colormaps["jet"](scaled)[..., :3]
    opacity = (HEAT_OPACITY * scaled)[..., None]
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    blended = Image.fromarray(
        np.rint((pixels * (1 - opacity) + colours * opacity) * 255).astype(np.uint8)
    )
    if lesion is not None:
        inside = Image.fromarray(lesion.astype(np.uint8) * 255)
        border = np.asarray(inside.filter(ImageFilter.MaxFilter(3))) > np.asarray(inside)
        outlined = np.asarray(blended).copy()
        outlined[border] = 255
        blended = Image.fromarray(outlined)
    # Scaled with the image, so captions read alike once the grid shrinks every overlay.
    font_size = max(10, round(1.9 * blended.width / CAPTION_CHARACTERS))
    font = ImageFont.load_default(size=font_size)
    line_height = font_size + CAPTION_PADDING
    framed = Image.new(
        "RGB", (blended.width, blended.height + line_height * len(caption) + CAPTION_PADDING)
    )
    framed.paste(blended, (0, 0))
    draw = ImageDraw.Draw(framed)
    for index, line in enumerate(caption):
        position = (CAPTION_PADDING, blended.height + CAPTION_PADDING + index * line_height)
        draw.text(position, line, fill=(255, 255, 255), font=font)
    return framed


def grid(overlays: Sequence[Image.Image], columns: int = 4) -> Image.Image:
    """The overlays as thumbnails THUMBNAIL_WIDTH wide, row by row."""
    thumbnails = [
        item.resize(
            (THUMBNAIL_WIDTH, max(1, round(item.height * THUMBNAIL_WIDTH / item.width))),
            Image.Resampling.LANCZOS,
        )
        for item in overlays
    ]
    columns = max(1, min(columns, len(thumbnails)))
    rows = [thumbnails[start : start + columns] for start in range(0, len(thumbnails), columns)]
    heights = [max(item.height for item in row) for row in rows] or [1]
    canvas = Image.new("RGB", (columns * THUMBNAIL_WIDTH, sum(heights)), (255, 255, 255))
    top = 0
    for row, height in zip(rows, heights, strict=True):
        for column, item in enumerate(row):
            canvas.paste(item, (column * THUMBNAIL_WIDTH, top))
        top += height
    return canvas
