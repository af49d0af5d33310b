"""Object detection and instance segmentation: retinanet_/fcos_/maskrcnn_ models on the digit scenes or a COCO
folder; COCO's box AP (and mask AP for Mask R-CNN) by pycocotools.

The models resize each image themselves (the shorter side to --img-size, see `detection_model_for_size`) and
return their losses in training, so a training step passes the targets into the model. Validation runs the
model on each image and hands all detections to COCOeval with the validation annotation file as the ground
truth; it has no validation loss.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..dense.coco_eval import detections_to_coco_results, evaluate_coco
from ..dense.detection import detection_model_for_size, split_detection_name
from ..errors import UserError
from .config import TrainConfig
from .detection_data import DetectionSplits, TensorList, build_detection_datasets, collate_detection
from .runtime import Dist, autocast
from .segmentation import CLASSIFICATION_ONLY, check_unused_options
from .task import Objective, Task, UnreadableImages, eval_batches


class DetectionTask(Task):
    """head: "retinanet" or "fcos" (boxes) or "maskrcnn" (boxes and masks). `evaluate` scores against the validation
    split that `build_datasets` built last."""

    name = "detection"
    metric = "val_bbox_ap"
    train_accuracy = None  # a detector has no per-image accuracy to count during training
    collate = staticmethod(collate_detection)

    def __init__(self, head: str) -> None:
        self.with_masks = head == "maskrcnn"
        self.splits: DetectionSplits | None = None

    def check_config(self, config: TrainConfig) -> None:
        check_unused_options(config, CLASSIFICATION_ONLY)

    def build_datasets(self, data: str, img_size: int, *, auto_augment: str | None = None,
                       eval_only: bool = False) -> DetectionSplits:
        if data == "digits":
            raise UserError("--data digits is a classification data set; detection models train on "
                            "--data digit-scenes or a folder in COCO's layout")
        self.splits = build_detection_datasets(data, with_masks=self.with_masks, eval_only=eval_only)
        for split, problems in self.splits.problems.items():
            if problems.clipped or problems.degenerate or problems.crowd:
                print(f"note: {problems.summary(split)}", file=sys.stderr)
        return self.splits

    def build_model(self, config: TrainConfig, num_classes: int) -> nn.Module:
        return detection_model_for_size(config.model, num_classes, config.img_size, drop_path_rate=config.drop_path)

    def build_objective(self, config: TrainConfig, num_classes: int, model: nn.Module) -> Objective:
        return Objective(criterion=nn.Identity())  # the models compute their own losses

    def forward(self, model: nn.Module, images: TensorList, targets: TensorList) -> dict[str, Tensor]:
        return model(list(images), list(targets))

    def loss(self, outputs: dict[str, Tensor], targets: TensorList, objective: Objective) -> Tensor:
        return sum(loss.float() for loss in outputs.values())

    def hits(self, outputs: Any, targets: Any) -> tuple[float, float]:
        return 0.0, 0.0

    def iou_types(self) -> tuple[str, ...]:
        return ("bbox", "segm") if self.with_masks else ("bbox",)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, env: Dist, amp: str = "none", desc: str = "val",
                 unreadable: UnreadableImages | None = None) -> dict[str, Any]:
        """COCO's AP, AP50, AP75, APs/m/l (percent) for boxes and, for Mask R-CNN, masks; "count" images."""
        if self.splits is None:
            raise RuntimeError("build_datasets must run before evaluate")
        model.eval()
        results: list[dict[str, Any]] = []
        seen = 0
        for images, targets in eval_batches(loader, env, desc, unreadable):
            with autocast(env.device, amp):
                detections = model(list(images))
            image_ids = [int(target["image_id"]) for target in targets]
            results += detections_to_coco_results(detections, image_ids, self.splits.category_ids, self.with_masks)
            seen += len(images)
        if env.world > 1:
            gathered: list[Any] = [None] * env.world
            dist.all_gather_object(gathered, (results, seen))
            results = [entry for part, _ in gathered for entry in part]
            seen = sum(count for _, count in gathered)
        if seen == 0:
            raise UserError("no validation image could be read")
        return {**evaluate_coco(self.splits.val_annotations, results, self.iou_types()), "count": seen}

    def metric_columns(self) -> tuple[str, ...]:
        columns = ("bbox_ap", "bbox_ap50", "bbox_ap75")
        return columns + ("segm_ap", "segm_ap50") if self.with_masks else columns

    def metadata(self, splits: DetectionSplits) -> dict[str, Any]:
        return {"task": self.name, "category_ids": list(splits.category_ids)}

    def summary(self, row: dict[str, Any], best: dict[str, Any], classes: list[str]) -> str:
        text = (f"final validation box AP: {row['val_bbox_ap']:.2f}% (best {best['val_bbox_ap']:.2f}% at epoch "
                f"{best['epoch']}), AP50 {row['val_bbox_ap50']:.2f}%")
        if self.with_masks:
            text += f"; mask AP {row['val_segm_ap']:.2f}%, AP50 {row['val_segm_ap50']:.2f}%"
        return text


def detection_task(name: str) -> DetectionTask:
    """The task of detection model `name` (`<head>_<backbone>`)."""
    return DetectionTask(split_detection_name(name)[0])
