"""Semantic segmentation: the SEGMENTATION_HEADS models on digit-scenes, a mask folder or ADE20K; mIoU and aAcc.

Validation runs each image whole (padded to a multiple of 32) at the validation scale and resizes the
logits back to the annotation's own size, so that metrics are counted on the annotation as it is.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..config import TaskOptions, TrainConfig, option
from ..data.segmentation import (
    IGNORE_INDEX,
    MaskBatch,
    SegmentationSplits,
    ValTransform,
    build_segmentation_datasets,
    collate_segmentation,
)
from ..dense.inference import AnySizeSegmenter, resize_scores, segment
from ..dense.metrics import ConfusionMatrix, iou_table
from ..dense.segmentation import SEGMENTATION_HEADS, create_segmentation_model, segmentation_settings
from ..errors import UserError
from ..files import save_png
from ..runtime import DistEnv, all_reduce_sum, autocast
from .base import Objective, Prediction, Restored, Task, UnreadableImages, eval_batches


def _crop_to(logits: Tensor, masks: Tensor) -> Tensor:
    """Training logits on the padded batch -> the masks' extent (training crops are not resized)."""
    return logits[..., : masks.shape[-2], : masks.shape[-1]]


MODE_HELP = "the whole (padded) image at once, or a sliding window"
FLIP_HELP = "average with the mirrored image's prediction"


@dataclass(frozen=True)
class SegmentationPredictOptions(TaskOptions):
    mode: str = option("whole", MODE_HELP, choices=("whole", "slide"))
    flip: bool = option(False, FLIP_HELP)

    def inference(self, img_size: int) -> dict[str, Any]:
        """Keyword arguments of `biformer.dense.segment` for a model restored at `img_size`."""
        return {"mode": self.mode, "window": img_size, "stride": None, "flip": self.flip}


@dataclass(frozen=True)
class SegmentationEvalOptions(SegmentationPredictOptions):
    window: int | None = option(None, "sliding window size in pixels (default: the input size)", least=1)
    stride: int | None = option(None, "sliding window stride in pixels (default: 2/3 of the window)", least=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode == "whole" and (self.window is not None or self.stride is not None):
            raise UserError("--window and --stride are for --mode slide; leave them out or add --mode slide")

    def inference(self, img_size: int) -> dict[str, Any]:
        window = self.window or img_size
        if self.stride is not None and self.stride > window:
            raise UserError(f"--stride {self.stride} is larger than --window {window}: the windows would leave pixels "
                            "between them unseen; choose a stride of at most the window")
        return {"mode": self.mode, "window": window, "stride": self.stride, "flip": self.flip}


class SegmentationTask(Task):
    """Training validates whole images; `eval` and `predict` also slide a window and flip (their options)."""

    name = "segmentation"
    heads = SEGMENTATION_HEADS
    default_data = "digit-scenes"
    reference_classes = 150  # ADE20K
    train_options = frozenset({"mean", "std"})
    EvalOptions = SegmentationEvalOptions
    PredictOptions = SegmentationPredictOptions
    predicts_files = True
    metric = "val_miou"
    train_accuracy = "train_aacc"
    collate = staticmethod(collate_segmentation)

    def build_datasets(self, data: str, img_size: int, *, auto_augment: str | None = None,
                       random_erasing: float = 0.0, eval_only: bool = False,
                       normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
                       ) -> SegmentationSplits:
        if data == "digits":
            raise UserError("--data digits is a classification data set; segmentation models train on "
                            "--data digit-scenes or a folder with images/, masks/ and classes.txt")
        return build_segmentation_datasets(data, img_size, eval_only=eval_only, normalization=normalization)

    def build_model(self, config: TrainConfig, classes: Sequence[str]) -> nn.Module:
        return create_segmentation_model(config.model, len(classes), drop_path_rate=config.drop_path,
                                         backbone_checkpoint=config.pretrained)

    def build_objective(self, config: TrainConfig, num_classes: int, model: nn.Module) -> Objective:
        return Objective(nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX), aux_weight=model.settings.aux_weight)

    def loss(self, outputs: dict[str, Tensor], targets: MaskBatch, objective: Objective) -> Tensor:
        masks = targets.masks
        loss = objective.criterion(_crop_to(outputs["out"], masks).float(), masks)
        if "aux" in outputs and objective.aux_weight:
            loss = loss + objective.aux_weight * objective.criterion(_crop_to(outputs["aux"], masks).float(), masks)
        return loss

    def hits(self, outputs: dict[str, Tensor], targets: MaskBatch) -> tuple[float, float]:
        masks = targets.masks
        counted = masks != IGNORE_INDEX
        correct = (_crop_to(outputs["out"], masks).argmax(1) == masks) & counted
        return correct.sum().item(), counted.sum().item()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, env: DistEnv, *, splits: SegmentationSplits,
                 options: SegmentationEvalOptions | None = None, amp: str = "none", desc: str = "val",
                 unreadable: UnreadableImages | None = None) -> dict[str, Any]:
        """Loss (per annotated pixel), mIoU and aAcc (percent), per-class IoU (fractions, None where undefined)."""
        inference = (options or SegmentationEvalOptions()).inference(splits.img_size)
        model.eval()
        confusion = ConfusionMatrix(model.num_classes, IGNORE_INDEX)
        loss_sum, images_seen = 0.0, 0
        for images, targets in eval_batches(loader, env, desc, unreadable):
            with autocast(env.device, amp):
                logits = segment(model, images, **inference)
            for sample, ((height, width), mask_size) in enumerate(zip(targets.image_sizes, targets.mask_sizes)):
                mask = targets.masks[sample, : mask_size[0], : mask_size[1]]
                sample_logits = resize_scores(logits[sample: sample + 1, :, :height, :width].float(), mask_size)
                loss_sum += F.cross_entropy(sample_logits, mask[None], ignore_index=IGNORE_INDEX, reduction="sum").item()
                confusion.update(sample_logits.argmax(1)[0], mask)
            images_seen += len(images)
        counts = all_reduce_sum([loss_sum, images_seen, *confusion.matrix.flatten().double().tolist()], env)
        loss_sum, images_seen = counts[0], int(counts[1])
        confusion.matrix = torch.tensor(counts[2:], dtype=torch.float64).round().long().reshape(confusion.matrix.shape)
        if images_seen == 0:
            raise UserError("no validation image could be read")
        pixels = confusion.matrix.sum().item()
        if pixels == 0:
            print("warning: no validation pixel is annotated (every mask value is the ignore index "
                  f"{IGNORE_INDEX}): loss, mIoU and aAcc are undefined", file=sys.stderr)
        return {"loss": loss_sum / pixels if pixels else math.nan, "miou": confusion.miou(), "aacc": confusion.aacc(),
                "class_iou": [None if math.isnan(value) else value for value in confusion.iou().tolist()],
                "confusion": confusion.matrix.tolist(), "count": images_seen}

    def metric_columns(self) -> tuple[str, ...]:
        return ("miou", "aacc", "class_iou")

    def metadata(self, splits: SegmentationSplits) -> dict[str, Any]:
        return {}

    def summary(self, row: dict[str, Any], best: dict[str, Any], classes: list[str]) -> str:
        return (f"final validation mIoU: {row['val_miou']:.2f}% (best {best['val_miou']:.2f}% at "
                f"{best['at']}), aAcc {row['val_aacc']:.2f}%\n" + iou_table(classes, row["val_class_iou"]))

    def deployable(self, model: nn.Module) -> nn.Module:
        """Logits (B, K, H, W) for images of any size (padded to multiples of 32 inside, then cropped)."""
        return AnySizeSegmenter(model).eval()

    def reference_size(self, model_name: str) -> int:
        return segmentation_settings(model_name).crop  # the ADE20K crop

    def restored_model(self, model_name: str, metadata: dict[str, Any], img_size: int) -> nn.Module:
        return create_segmentation_model(model_name, len(metadata["classes"]))

    def report(self, result: dict[str, Any], restored: Restored, checkpoint: str) -> str:
        return (f"{checkpoint}: mIoU {result['miou']:.2f}%  aAcc {result['aacc']:.2f}%  "
                f"val_loss {result['loss']:.4f}  ({result['count']} images)\n"
                + iou_table(restored.classes, result["class_iou"]))

    @torch.no_grad()
    def predict(self, restored: Restored, images: Iterable[tuple[str, Any]], options: SegmentationPredictOptions,
                device: Any, outputs: dict[str, Path] | None) -> Iterator[Prediction]:
        """Write <stem>_overlay.png (the image tinted by class, with a legend) and <stem>_labels.png (a class index
        per pixel) per image; the result counts the pixels of each class found."""
        from ..dense.drawing import overlay

        transform = ValTransform(restored.img_size, restored.mean, restored.std)
        model = restored.model.to(device)
        inference = options.inference(restored.img_size)
        for path, image in images:
            logits = segment(model, transform.image(image)[None].to(device), **inference)
            labels = resize_scores(logits, (image.height, image.width)).argmax(1)[0].to(torch.uint8).cpu().numpy()
            files = (f"{outputs[path]}_overlay.png", f"{outputs[path]}_labels.png")
            save_png(overlay(image, labels, restored.classes), files[0])
            save_png(Image.fromarray(labels, mode="L"), files[1])
            indices, counts = np.unique(labels, return_counts=True)
            yield Prediction(path, {"pixels": {restored.classes[i]: int(n) for i, n in zip(indices, counts)}}, files)

    def prediction_text(self, prediction: Prediction) -> str:
        return f"{prediction.image} -> {', '.join(prediction.files)}"
