"""Semantic segmentation metrics from a confusion matrix: per-class IoU, mIoU and aAcc (mmseg's definitions).

`matrix[t, p]` counts pixels of true class t predicted as p; ignored pixels are not counted. A class
absent from both the annotations and the predictions has no IoU (NaN) and is left out of the mean,
as in mmseg; aAcc is the fraction of counted pixels predicted correctly.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


class ConfusionMatrix:
    """Accumulates (num_classes, num_classes) pixel counts over batches; int64, on the predictions' device."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, predictions: Tensor, targets: Tensor) -> None:
        """predictions, targets: integer tensors of one shape; target pixels equal to ignore_index are skipped."""
        if predictions.shape != targets.shape:
            raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ in shape")
        keep = targets != self.ignore_index
        pairs = targets[keep].long() * self.num_classes + predictions[keep].long()
        counts = torch.bincount(pairs, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)
        self.matrix = self.matrix.to(counts.device) + counts

    def iou(self) -> Tensor:
        """Per-class IoU in [0, 1] (float64), NaN for a class that is neither present nor predicted."""
        matrix = self.matrix.double()
        intersection = matrix.diagonal()
        union = matrix.sum(0) + matrix.sum(1) - intersection
        return torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, float("nan")))

    def miou(self) -> float:
        """Mean IoU over the classes that have one, in percent."""
        return 100 * self.iou().nanmean().item()

    def aacc(self) -> float:
        """Pixel accuracy over all counted pixels, in percent."""
        total = self.matrix.sum().item()
        return 100 * self.matrix.diagonal().sum().item() / total if total else float("nan")


def iou_table(classes: list[str], iou: Sequence[float | None]) -> str:
    """A two-column text table of per-class IoU (fractions) in percent ("-" where a class has none: None or NaN)."""
    width = max(len("class"), *(len(name) for name in classes))
    lines = [f"{'class':<{width}}  IoU (%)"]
    lines += [f"{name:<{width}}  {'-' if value is None or math.isnan(value) else f'{100 * value:6.2f}'}"
              for name, value in zip(classes, iou)]
    return "\n".join(lines)
