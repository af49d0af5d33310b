"""Label maps as pictures: a fixed colour per class, and a colour overlay on the image with a legend."""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

LEGEND_ROW = 14  # pixels per legend line (PIL's default bitmap font is 11 px high)


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, distinct and stable: hues spaced by the golden ratio, two brightnesses."""
    colours = [colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.75, 0.95 if index % 2 else 0.7)
               for index in range(num_classes)]
    return (np.array(colours) * 255).round().astype(np.uint8).reshape(num_classes, 3)


def overlay(image: Image.Image, labels: np.ndarray, classes: list[str], alpha: float = 0.5) -> Image.Image:
    """The image with each pixel tinted by its class colour, and a legend of the classes present below it.

    labels: (H, W) class indices of the image's own size.
    """
    if labels.shape != (image.height, image.width):
        raise ValueError(f"labels {labels.shape} do not match the image's size {(image.height, image.width)}")
    colours = palette(len(classes))
    blended = (1 - alpha) * np.asarray(image.convert("RGB"), dtype=np.float32) + alpha * colours[labels]
    picture = Image.fromarray(blended.round().astype(np.uint8))
    present = [int(index) for index in np.unique(labels)]
    canvas = Image.new("RGB", (image.width, image.height + LEGEND_ROW * len(present) + 4), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for line, index in enumerate(present):
        top = image.height + 2 + LEGEND_ROW * line
        draw.rectangle((2, top + 1, 12, top + 11), fill=tuple(int(c) for c in colours[index]))
        draw.text((16, top), classes[index], fill="black")
    return canvas
