"""Segmentation inference at any input size: the whole image (padded), or a sliding window; optional flip.

A segmentation model maps (B, 3, H, W) with H, W multiples of 32 to {"out": (B, K, H, W) logits}.
`segment` pads to what the model accepts, crops the padding off again and, with `flip`, averages
the class probabilities of the image and its mirror image, as mmseg's test-time augmentation does
(returned as their logarithm, so that every result is a logit map: argmax, softmax and cross-entropy
apply alike).

Shape legend: B batch, K classes, H/W image height/width.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.exporting import known_zero

SEGMENTATION_MODES = ("whole", "slide")
STRIDE_MULTIPLE = 32  # the backbones' total downsampling


def _logits(model: nn.Module, images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, K, H, W) for any H, W: zero-padded at the bottom/right to multiples of 32, then cropped."""
    height, width = images.shape[-2:]  # 0-d tensors under torch.jit.trace: the trace follows them
    # the padded sides written as multiples of 32: for symbolic sizes (torch.export) the model's maps then have
    # sides that simplify (a multiple of 32 halved is a multiple of 16), not nested remainders
    fit = lambda side: (side + STRIDE_MULTIPLE - 1) // STRIDE_MULTIPLE * STRIDE_MULTIPLE - side  # noqa: E731
    pad_h, pad_w = fit(height), fit(width)
    padded = images if known_zero(pad_h) and known_zero(pad_w) else F.pad(images, (0, pad_w, 0, pad_h))
    return model(padded)["out"][..., :height, :width]


class AnySizeSegmenter(nn.Module):
    """A segmentation model as one module for any input size, to export: (B, 3, H, W) -> (B, K, H, W) logits,
    the whole-image inference of `segment`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return _logits(self.model, images)


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window starts that cover 0..length, the last one flush with the end (one window if it fits)."""
    count = math.ceil(max(length - window, 0) / stride) + 1
    return [min(index * stride, max(length - window, 0)) for index in range(count)]


def _sliding_logits(model: nn.Module, images: Tensor, window: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Mean logits over overlapping windows (each window padded like the whole image if the image is smaller)."""
    height, width = images.shape[-2:]
    total, hits = None, images.new_zeros(1, 1, height, width)
    for top in _window_starts(height, window[0], stride[0]):
        for left in _window_starts(width, window[1], stride[1]):
            rows, cols = slice(top, top + window[0]), slice(left, left + window[1])
            logits = _logits(model, images[..., rows, cols])
            if total is None:
                total = logits.new_zeros(*logits.shape[:2], height, width)
            total[..., rows, cols] += logits
            hits[..., rows, cols] += 1
    return total / hits


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def segment(
    model: nn.Module,
    images: Tensor,
    *,
    mode: str = "whole",
    window: int | tuple[int, int] = 512,
    stride: int | tuple[int, int] | None = None,
    flip: bool = False,
) -> Tensor:
    """Class logits (B, K, H, W) of images (B, 3, H, W), any H, W.

    mode "whole": one pass over the zero-padded image; "slide": windows of `window` pixels every `stride`
    (default two thirds of the window, as mmseg's 512/341 configs), their logits averaged where they
    overlap. flip: also run the horizontally mirrored image and average the two probabilities (-> log).
    """
    if mode not in SEGMENTATION_MODES:
        raise ValueError(f"mode must be one of {', '.join(SEGMENTATION_MODES)}, got {mode!r}")
    window = _pair(window)
    stride = tuple(2 * side // 3 for side in window) if stride is None else _pair(stride)
    if min(window) < 1 or min(stride) < 1:
        raise ValueError(f"window {window} and stride {stride} must be positive")

    def logits(batch: Tensor) -> Tensor:
        scores = _logits(model, batch) if mode == "whole" else _sliding_logits(model, batch, window, stride)
        return scores.float()

    scores = logits(images)
    if not flip:
        return scores
    mean = (scores.softmax(1) + logits(images.flip(-1)).flip(-1).softmax(1)) / 2
    return mean.clamp_min(torch.finfo(mean.dtype).tiny).log()  # a finite logit where a probability underflowed


def resize_scores(scores: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, K, h, w) scores or logits -> (B, K, *size), bilinear (as mmseg resizes logits to the annotation)."""
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)


__all__ = ["SEGMENTATION_MODES", "resize_scores", "segment"]
