"""Object detection and instance segmentation: the DETECTION_HEADS models on the digit scenes or a COCO folder;
COCO's box AP (and mask AP for instance masks) by pycocotools.

The models resize each image themselves (the shorter side to --img-size, see `detection_model_for_size`) and
return their losses in training, so a training step passes the targets into the model. Validation runs the
model on each image and hands all detections to COCOeval with the validation annotation file as the ground
truth; it has no validation loss.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..config import TrainConfig
from ..data.coco import DetectionSplits, TensorList, build_detection_datasets, collate_detection
from ..dense.coco_eval import METRIC_NAMES, detections_to_coco_results, evaluate_coco, write_coco_results
from ..dense.detection import DETECTION_HEADS, MASK_HEADS, detection_model_for_size, split_detection_name
from ..errors import UserError
from ..files import save_png
from ..runtime import Dist, autocast
from .base import Objective, Restored, Task, UnreadableImages, eval_batches


class DetectionTask(Task):
    """head: one of DETECTION_HEADS; those in MASK_HEADS also predict instance masks. `evaluate` scores against
    the validation split that `build_datasets` built last."""

    name = "detection"
    heads = DETECTION_HEADS
    default_data = "digit-scenes"
    reference_classes = 80  # COCO
    predict_options = frozenset({"output", "score_threshold", "annotations"})
    predicts_files = True
    metric = "val_bbox_ap"
    train_accuracy = None  # a detector has no per-image accuracy to count during training
    collate = staticmethod(collate_detection)

    def __init__(self, head: str) -> None:
        self.with_masks = head in MASK_HEADS
        self.splits: DetectionSplits | None = None
        self.image_ids: dict[str, int] | None = None  # predict: file name -> COCO image id (--annotations)

    @classmethod
    def for_model(cls, model_name: str) -> DetectionTask:
        return cls(split_detection_name(model_name)[0])

    def build_datasets(self, data: str, img_size: int, *, auto_augment: str | None = None,
                       random_erasing: float = 0.0,
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
        return detection_model_for_size(config.model, num_classes, config.img_size, drop_path_rate=config.drop_path,
                                        backbone_checkpoint=config.pretrained)

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
        return {"category_ids": list(splits.category_ids)}

    def summary(self, row: dict[str, Any], best: dict[str, Any], classes: list[str]) -> str:
        text = (f"final validation box AP: {row['val_bbox_ap']:.2f}% (best {best['val_bbox_ap']:.2f}% at "
                f"{best['at']}), AP50 {row['val_bbox_ap50']:.2f}%")
        if self.with_masks:
            text += f"; mask AP {row['val_segm_ap']:.2f}%, AP50 {row['val_segm_ap50']:.2f}%"
        return text

    def export_not_supported_reasons(self, settings: Any) -> list[str]:
        """torchvision's detectors export through the TorchScript-based ONNX exporter only, at a fixed size: their
        box filtering has data-dependent sizes, which torch.export (and so the dynamo exporter) cannot hold, and
        they return a list of dicts, which torch.jit.trace refuses."""
        if settings.format == "onnx" and settings.legacy:
            return ["detection models export at a fixed size: leave out --dynamic (torchvision's detectors resize "
                    "and filter with sizes a trace keeps)"] if settings.dynamic else []
        return ["detection models export with --format onnx --legacy only (torchvision's box filtering has "
                "data-dependent sizes, which torch.export cannot hold; a trace cannot return their dicts)"]

    def restored_model(self, model_name: str, metadata: dict[str, Any], img_size: int) -> nn.Module:
        return detection_model_for_size(model_name, len(metadata["classes"]), img_size)

    def report(self, result: dict[str, Any], restored: Restored, checkpoint: str) -> str:
        lines = [f"{checkpoint}: {result['count']} images, COCO AP (%) at shorter side {restored.img_size}",
                 f"{'':6}" + "".join(f"{name:>8}" for name in METRIC_NAMES)]
        lines += [f"{iou_type:<6}" + "".join(f"{result[f'{iou_type}_{name}']:8.2f}" for name in METRIC_NAMES)
                  for iou_type in self.iou_types()]
        return "\n".join(lines)

    def check_predict(self, args: argparse.Namespace, files: list[str]) -> None:
        if not 0 <= args.score_threshold <= 1:
            raise UserError(f"--score-threshold must be within 0..1, got {args.score_threshold}")
        self.image_ids = _coco_image_ids(args.annotations, files) if args.annotations else None

    @torch.no_grad()
    def predict(self, images: Iterable[tuple[str, Any]], restored: Restored, args: argparse.Namespace,
                device: Any, outputs: dict[str, Path] | None) -> list[str]:
        """Draw each image's detections (<stem>_detections.png) and write them all to detections.json (COCO's
        results format) in --output; image ids from --annotations, else 1, 2, ... in order."""
        import torchvision.transforms.functional as F

        from ..dense.drawing import draw_detections

        model = restored.model.to(device)
        scoring = getattr(model, "roi_heads", model)  # where Mask R-CNN / RetinaNet / FCOS keep their cut-off
        scoring.score_thresh = min(scoring.score_thresh, args.score_threshold)
        category_ids = restored.metadata.get("category_ids") or list(range(1, len(restored.classes) + 1))
        results: list[dict[str, Any]] = []
        skipped: list[str] = []
        for number, (path, image) in enumerate(images, 1):
            image_id = number if self.image_ids is None else self.image_ids[Path(path).name]
            if _resized_short_side(model.transform, image.height, image.width) < 1:
                print(f"skipping {path}: at {image.width}x{image.height} it is too elongated for the model's resize "
                      f"(shorter side to {restored.img_size}, the longer at most {model.transform.max_size}) to keep "
                      "a pixel of its shorter side", file=sys.stderr)
                skipped.append(path)
                continue
            detection = {key: value.cpu() for key, value in model([F.to_tensor(image).to(device)])[0].items()}
            results += detections_to_coco_results([detection], [image_id], category_ids, "masks" in detection)
            picture = Path(f"{outputs[path]}_detections.png")
            save_png(draw_detections(image, detection, restored.classes, args.score_threshold), picture)
            shown = int((detection["scores"] >= args.score_threshold).sum())
            print(f"{path} (image id {image_id}): {len(detection['scores'])} detections, {shown} drawn -> {picture}")
        folder = Path(args.output).expanduser()
        write_coco_results(results, folder / "detections.json")
        print(f"{len(results)} detections -> {folder / 'detections.json'}")
        return skipped


def _resized_short_side(transform: nn.Module, height: int, width: int) -> int:
    """The shorter side of an image after torchvision's GeneralizedRCNNTransform resize (its scale is capped so
    that the longer side stays within max_size; the size is rounded down)."""
    short, long = min(height, width), max(height, width)
    scale = min(transform.min_size[-1] / short, transform.max_size / long)
    return int(short * scale)


def _coco_image_ids(annotations: str, files: list[str]) -> dict[str, int]:
    """File name -> image id of each of `files` in a COCO instances file; UserError for a file it does not list."""
    from ..files import read_json

    data = read_json(annotations, "--annotations file")
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "file_name" in e and "id" in e for e in entries):
        raise UserError(f"--annotations {annotations!r} has no 'images' list with 'id' and 'file_name' entries "
                        "(COCO's instances format)")
    ids = {Path(entry["file_name"]).name: entry["id"] for entry in entries}
    unlisted = [Path(path).name for path in files if Path(path).name not in ids]
    if unlisted:
        raise UserError(f"--annotations {annotations!r} lists no image named {unlisted[0]!r}"
                        + (f" (nor {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""))
    return ids
