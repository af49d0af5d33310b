"""Semantic segmentation: sfpn_/upernet_ models on digit-scenes, a mask folder or ADE20K; mIoU and aAcc.

Validation runs each image whole (padded to a multiple of 32) at the validation scale and resizes the
logits back to the annotation's own size, so that metrics are counted on the annotation as it is.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..dense.inference import resize_scores, segment
from ..dense.metrics import ConfusionMatrix, iou_table
from ..dense.segmentation import create_segmentation_model
from ..errors import UserError
from .config import TrainConfig, flag
from .runtime import Dist, all_reduce_sum, autocast
from .segmentation_data import IGNORE_INDEX, MaskBatch, SegmentationSplits, build_segmentation_datasets, collate_segmentation
from .task import Objective, Task, UnreadableImages, eval_batches

CLASSIFICATION_ONLY = ("mixup", "cutmix", "smoothing", "aa", "model_kwargs")


def check_unused_options(config: TrainConfig, names: tuple[str, ...]) -> None:
    """UserError naming the options among `names` that are set although the model's task ignores them."""
    used = [flag(name) for name in names if getattr(config, name)]
    if used:
        raise UserError(f"classification-only option(s) {', '.join(used)}: leave them out for {config.model}")


def _crop_to(logits: Tensor, masks: Tensor) -> Tensor:
    """Training logits on the padded batch -> the masks' extent (training crops are not resized)."""
    return logits[..., : masks.shape[-2], : masks.shape[-1]]


class SegmentationTask(Task):
    """inference: keyword arguments of `biformer.dense.segment` for evaluation (mode, window, stride, flip);
    training validates whole images."""

    name = "segmentation"
    metric = "val_miou"
    train_accuracy = "train_aacc"
    collate = staticmethod(collate_segmentation)

    def __init__(self, **inference: Any) -> None:
        self.inference = inference

    def check_config(self, config: TrainConfig) -> None:
        check_unused_options(config, CLASSIFICATION_ONLY)

    def build_datasets(self, data: str, img_size: int, *, auto_augment: str | None = None,
                       eval_only: bool = False) -> SegmentationSplits:
        if data == "digits":
            raise UserError("--data digits is a classification data set; segmentation models train on "
                            "--data digit-scenes or a folder with images/, masks/ and classes.txt")
        return build_segmentation_datasets(data, img_size, eval_only=eval_only)

    def build_model(self, config: TrainConfig, num_classes: int) -> nn.Module:
        return create_segmentation_model(config.model, num_classes, drop_path_rate=config.drop_path)

    def build_objective(self, config: TrainConfig, num_classes: int, model: nn.Module) -> Objective:
        return Objective(nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX), aux_weight=model.recipe.aux_weight)

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
    def evaluate(self, model: nn.Module, loader: DataLoader, env: Dist, amp: str = "none", desc: str = "val",
                 unreadable: UnreadableImages | None = None) -> dict[str, Any]:
        """Loss (per annotated pixel), mIoU and aAcc (percent), per-class IoU (fractions, None where undefined)."""
        model.eval()
        confusion = ConfusionMatrix(model.num_classes, IGNORE_INDEX)
        loss_sum, images_seen = 0.0, 0
        for images, targets in eval_batches(loader, env, desc, unreadable):
            with autocast(env.device, amp):
                logits = segment(model, images, **self.inference)
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
        return {"loss": loss_sum / max(pixels, 1), "miou": confusion.miou(), "aacc": confusion.aacc(),
                "class_iou": [None if math.isnan(value) else value for value in confusion.iou().tolist()],
                "confusion": confusion.matrix.tolist(), "count": images_seen}

    def metric_columns(self) -> tuple[str, ...]:
        return ("miou", "aacc", "class_iou")

    def metadata(self, splits: SegmentationSplits) -> dict[str, Any]:
        return {"task": self.name}

    def summary(self, row: dict[str, Any], best: dict[str, Any], classes: list[str]) -> str:
        return (f"final validation mIoU: {row['val_miou']:.2f}% (best {best['val_miou']:.2f}% at epoch "
                f"{best['epoch']}), aAcc {row['val_aacc']:.2f}%\n" + iou_table(classes, row["val_class_iou"]))
