"""Predictions as pictures: a fixed colour per class; a label map as a colour overlay with a legend, and
detections as boxes with their class and score (and masks) drawn by torchvision's drawing utilities."""
from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

LEGEND_FONT_SIZE = 16  # the legend's text, in pixels (PIL's scalable default font)
LEGEND_ROW = 22  # pixels per legend line
LEGEND_TEXT_LEFT = 26  # where a legend line's class name starts, right of its colour swatch
MIN_SIDE = 384  # smaller images are enlarged (nearest, by an integer factor) so that labels stay legible


def enlargement(image: Image.Image) -> int:
    """The integer factor that brings an image's shorter side to at least MIN_SIDE (1 for larger images)."""
    return max(1, -(-MIN_SIDE // min(image.width, image.height)))  # ceil


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, distinct and stable: hues spaced by the golden ratio, two brightnesses."""
    colours = [colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.75, 0.95 if index % 2 else 0.7)
               for index in range(num_classes)]
    return (np.array(colours) * 255).round().astype(np.uint8).reshape(num_classes, 3)


def overlay(image: Image.Image, labels: np.ndarray, classes: list[str], alpha: float = 0.5) -> Image.Image:
    """The image with each pixel tinted by its class colour, and a legend of the classes present below it; an image
    whose shorter side is under MIN_SIDE is enlarged first (nearest, its labels with it).

    labels: (H, W) class indices of the image's own size.
    """
    if labels.shape != (image.height, image.width):
        raise ValueError(f"labels {labels.shape} do not match the image's size {(image.height, image.width)}")
    factor = enlargement(image)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).repeat(factor, 0).repeat(factor, 1)
    colours = palette(len(classes))
    blended = (1 - alpha) * pixels + alpha * colours[labels.repeat(factor, 0).repeat(factor, 1)]
    picture = Image.fromarray(blended.round().astype(np.uint8))
    image = picture  # the canvas below is laid out around the enlarged image
    present = [int(index) for index in np.unique(labels)]
    font = ImageFont.load_default(size=LEGEND_FONT_SIZE)
    measure = ImageDraw.Draw(picture)
    legend_width = max(LEGEND_TEXT_LEFT + measure.textlength(classes[index], font=font) + 4 for index in present)
    # the canvas widens where a class name is longer than the image is wide: no legend line is cut off
    canvas = Image.new("RGB", (max(image.width, int(np.ceil(legend_width))), image.height + LEGEND_ROW * len(present) + 4),
                       "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for line, index in enumerate(present):
        top = image.height + 2 + LEGEND_ROW * line
        draw.rectangle((4, top + 2, 20, top + 18), fill=tuple(int(c) for c in colours[index]), outline="black")
        draw.text((LEGEND_TEXT_LEFT, top), classes[index], fill="black", font=font)
    return canvas


def draw_detections(image: Image.Image, detection: dict[str, Tensor], classes: list[str],
                    score_threshold: float = 0.3, mask_threshold: float = 0.5) -> Image.Image:
    """The image with each detection scoring at least `score_threshold` drawn: its box and "class score" in
    the class's colour and, where the detection has masks, the mask tinted in it.

    detection: a detection model's output for this image ({"boxes": (N, 4) x1, y1, x2, y2 in the image's
    pixels, "labels": (N,) 1..K, "scores": (N,), optional "masks": (N, 1, H, W) probabilities}); label k is
    classes[k - 1]. Images whose shorter side is under MIN_SIDE are enlarged first, boxes and masks with them.
    """
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    keep = detection["scores"] >= score_threshold
    factor = enlargement(image)
    picture = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    picture = picture.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    labels = detection["labels"][keep].tolist()
    colours = [tuple(int(c) for c in palette(len(classes) + 1)[label]) for label in labels]  # as overlay's indices
    if "masks" in detection and labels:
        masks = detection["masks"][keep][:, 0] >= mask_threshold
        masks = masks.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
        picture = draw_segmentation_masks(picture, masks, alpha=0.45, colors=colours)
    if labels:
        captions = [f"{classes[label - 1]} {score:.2f}" for label, score in zip(labels, detection["scores"][keep].tolist())]
        picture = draw_bounding_boxes(picture, detection["boxes"][keep].float() * factor, captions, colors=colours,
                                      width=2, label_colors="white", label_background_colors=colours, fill_labels=True)
    return Image.fromarray(picture.permute(1, 2, 0).numpy())
