"""Object detection and instance segmentation: the DETECTION_HEADS models on the digit scenes or a COCO folder;
COCO's box AP (and mask AP for instance masks) by pycocotools.

The models resize each image themselves (the shorter side to --img-size, see `detection_model_for_size`) and
return their losses in training, so a training step passes the targets into the model. Validation runs the
model on each image and hands all detections to COCOeval with the validation annotation file as the ground
truth; it has no validation loss.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..config import TaskOptions, TrainConfig, option
from ..data.coco import DetectionSplits, TensorList, build_detection_datasets, collate_detection
from ..dense.coco_eval import METRIC_NAMES, detections_to_coco_results, evaluate_coco, write_coco_results
from ..dense.detection import (
    DETECTION_HEADS,
    MASK_HEADS,
    detection_model_for_size,
    detection_settings,
    split_detection_name,
)
from ..errors import UserError
from ..files import save_png
from ..runtime import DistEnv, autocast
from .base import Objective, Prediction, Restored, Task, UnreadableImages, eval_batches


@dataclass(frozen=True)
class DetectionPredictOptions(TaskOptions):
    score_threshold: float = option(0.3, "draw the detections scoring at least this (the COCO results keep them "
                                         "all); below the model's own cut-off (0.05) it lowers that too", least=0)
    annotations: str | None = option(None, "a COCO instances file that lists the images: their ids go into "
                                           "detections.json (default: 1, 2, ... in the order of the images)",
                                     metavar="JSON")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score_threshold > 1:
            raise UserError(f"--score-threshold must be within 0..1, got {self.score_threshold}")


class DetectionTask(Task):
    """head: one of DETECTION_HEADS; those in MASK_HEADS also predict instance masks."""

    name = "detection"
    heads = DETECTION_HEADS
    default_data = "digit-scenes"
    reference_classes = 80  # COCO
    PredictOptions = DetectionPredictOptions
    predicts_files = True
    normalizes_inside = True  # torchvision's transform, with ImageNet's statistics
    metric = "val_bbox_ap"
    train_accuracy = None  # a detector has no per-image accuracy to count during training
    collate = staticmethod(collate_detection)

    def __init__(self, head: str) -> None:
        self.with_masks = head in MASK_HEADS

    @classmethod
    def for_model(cls, model_name: str) -> DetectionTask:
        return cls(split_detection_name(model_name)[0])

    def build_datasets(self, data: str, img_size: int, *, auto_augment: str | None = None,
                       random_erasing: float = 0.0, eval_only: bool = False,
                       normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> DetectionSplits:
        if data == "digits":
            raise UserError("--data digits is a classification data set; detection models train on "
                            "--data digit-scenes or a folder in COCO's layout")
        splits = build_detection_datasets(data, with_masks=self.with_masks, eval_only=eval_only)
        for split, problems in splits.problems.items():
            if problems.clipped or problems.degenerate or problems.crowd:
                print(f"note: {problems.summary(split)}", file=sys.stderr)
        return splits

    def build_model(self, config: TrainConfig, classes: Sequence[str]) -> nn.Module:
        return detection_model_for_size(config.model, len(classes), config.img_size, drop_path_rate=config.drop_path,
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
    def evaluate(self, model: nn.Module, loader: DataLoader, env: DistEnv, *, splits: DetectionSplits,
                 options: TaskOptions | None = None, amp: str = "none", desc: str = "val",
                 unreadable: UnreadableImages | None = None) -> dict[str, Any]:
        """COCO's AP, AP50, AP75, APs/m/l (percent) for boxes and, for Mask R-CNN, masks; "count" images."""
        model.eval()
        results: list[dict[str, Any]] = []
        seen = 0
        for images, targets in eval_batches(loader, env, desc, unreadable):
            with autocast(env.device, amp):
                detections = model(list(images))
            image_ids = [int(target["image_id"]) for target in targets]
            results += detections_to_coco_results(detections, image_ids, splits.category_ids, self.with_masks)
            seen += len(images)
        if env.distributed:
            gathered: list[Any] = [None] * env.world
            dist.all_gather_object(gathered, (results, seen))
            results = [entry for part, _ in gathered for entry in part]
            seen = sum(count for _, count in gathered)
        if seen == 0:
            raise UserError("no validation image could be read")
        return {**evaluate_coco(splits.val_annotations, results, self.iou_types()), "count": seen}

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

    def reference_size(self, model_name: str) -> int:
        return detection_settings(model_name).min_size  # COCO's shorter side

    def restored_model(self, model_name: str, metadata: dict[str, Any], img_size: int) -> nn.Module:
        return detection_model_for_size(model_name, len(metadata["classes"]), img_size)

    def report(self, result: dict[str, Any], restored: Restored, checkpoint: str) -> str:
        lines = [f"{checkpoint}: {result['count']} images, COCO AP (%) at shorter side {restored.img_size}",
                 f"{'':6}" + "".join(f"{name:>8}" for name in METRIC_NAMES)]
        lines += [f"{iou_type:<6}" + "".join(f"{result[f'{iou_type}_{name}']:8.2f}" for name in METRIC_NAMES)
                  for iou_type in self.iou_types()]
        return "\n".join(lines)

    def check_predict(self, options: DetectionPredictOptions, files: list[str]) -> None:
        if options.annotations:
            ids = _coco_image_ids(options.annotations)
            unlisted = [Path(path).name for path in files if Path(path).name not in ids]
            if unlisted:
                raise UserError(f"--annotations {options.annotations!r} lists no image named {unlisted[0]!r}"
                                + (f" (nor {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""))

    @torch.no_grad()
    def predict(self, restored: Restored, images: Iterable[tuple[str, Any]], options: DetectionPredictOptions,
                device: Any, outputs: dict[str, Path] | None) -> Iterator[Prediction]:
        """Draw each image's detections (<stem>_detections.png); the result holds them in COCO's results format,
        with image ids from --annotations, else 1, 2, ... in order."""
        import torchvision.transforms.functional as F

        from ..dense.drawing import draw_detections

        model = restored.model.to(device)
        scoring = getattr(model, "roi_heads", model)  # where Mask R-CNN / RetinaNet / FCOS keep their cut-off
        scoring.score_thresh = min(scoring.score_thresh, options.score_threshold)
        category_ids = restored.metadata.get("category_ids") or list(range(1, len(restored.classes) + 1))
        image_ids = _coco_image_ids(options.annotations) if options.annotations else None  # check_predict checked
        for number, (path, image) in enumerate(images, 1):
            if _resized_short_side(model.transform, image.height, image.width) < 1:
                yield Prediction(path, problem=f"at {image.width}x{image.height} it is too elongated for the model's "
                                 f"resize (shorter side to {restored.img_size}, the longer at most "
                                 f"{model.transform.max_size}) to keep a pixel of its shorter side")
                continue
            image_id = number if image_ids is None else image_ids[Path(path).name]
            detection = {key: value.cpu() for key, value in model([F.to_tensor(image).to(device)])[0].items()}
            picture = f"{outputs[path]}_detections.png"
            save_png(draw_detections(image, detection, restored.classes, options.score_threshold), picture)
            yield Prediction(path, {
                "image_id": image_id, "drawn": int((detection["scores"] >= options.score_threshold).sum()),
                "detections": detections_to_coco_results([detection], [image_id], category_ids, "masks" in detection),
            }, (picture,))

    def prediction_text(self, prediction: Prediction) -> str:
        result = prediction.result
        return (f"{prediction.image} (image id {result['image_id']}): {len(result['detections'])} detections, "
                f"{result['drawn']} drawn -> {prediction.files[0]}")

    def write_predictions(self, predictions: list[Prediction], folder: Path | None) -> list[Path]:
        """detections.json: every image's detections in COCO's results format."""
        path = Path(folder) / "detections.json"
        write_coco_results([entry for prediction in predictions if prediction.problem is None
                            for entry in prediction.result["detections"]], path)
        return [path]


def _resized_short_side(transform: nn.Module, height: int, width: int) -> int:
    """The shorter side of an image after torchvision's GeneralizedRCNNTransform resize (its scale is capped so
    that the longer side stays within max_size; the size is rounded down)."""
    short, long = min(height, width), max(height, width)
    scale = min(transform.min_size[-1] / short, transform.max_size / long)
    return int(short * scale)


def _coco_image_ids(annotations: str) -> dict[str, int]:
    """File name -> image id of the images a COCO instances file lists."""
    from ..files import read_json

    data = read_json(annotations, "--annotations file")
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "file_name" in e and "id" in e for e in entries):
        raise UserError(f"--annotations {annotations!r} has no 'images' list with 'id' and 'file_name' entries "
                        "(COCO's instances format)")
    return {Path(entry["file_name"]).name: entry["id"] for entry in entries}
