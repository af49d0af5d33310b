"""Ready-to-run dense models (segmentation, detection) from weights files of `biformer train`, for eval and predict."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoints.files import load_weights, read_metadata, read_state_dict
from ..errors import UserError
from .detection import detection_model_for_size, is_detection_model
from .segmentation import create_segmentation_model, is_segmentation_model

DENSE_TASKS = ("segmentation", "detection")


@dataclass
class RestoredDense:
    model: nn.Module  # in eval mode
    model_name: str
    task: str  # "segmentation" or "detection"
    classes: list[str]
    img_size: int  # the validation scale: images are resized so that their shorter side has this length
    mean: tuple[float, ...]
    std: tuple[float, ...]
    category_ids: list[int] = field(default_factory=list)  # detection: label k's COCO category id is [k - 1]


def dense_task(checkpoint: str | os.PathLike, model_name: str | None = None) -> str | None:
    """The dense task ("segmentation", "detection") of a weights file or of the --model given for it; None for
    a classifier's."""
    if model_name is not None:
        return ("segmentation" if is_segmentation_model(model_name)
                else "detection" if is_detection_model(model_name) else None)
    task = read_metadata(checkpoint).get("task") if Path(checkpoint).is_file() else None
    return task if task in DENSE_TASKS else None


def _build(metadata: dict[str, Any], img_size: int) -> nn.Module:
    if metadata["task"] == "detection":
        return detection_model_for_size(metadata["model"], len(metadata["classes"]), img_size)
    return create_segmentation_model(metadata["model"], len(metadata["classes"]))


def restore_dense_model(checkpoint: str | os.PathLike, img_size: int | None = None) -> RestoredDense:
    """The model of a segmentation or detection weights file written by `biformer train`, with its classes and
    preprocessing; img_size replaces the training's shorter image side."""
    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"--checkpoint {str(checkpoint)!r} does not exist")
    metadata = read_metadata(path)
    missing = [key for key in ("model", "task", "classes", "img_size", "mean", "std") if key not in metadata]
    if missing or metadata["task"] not in DENSE_TASKS:
        raise UserError(f"--checkpoint {str(checkpoint)!r} lacks {', '.join(missing) or 'a dense task'} in its metadata: "
                        "segmentation and detection models are restored from the .safetensors files that "
                        "`biformer train` writes")
    img_size = img_size or metadata["img_size"]
    model = _build(metadata, img_size)
    try:
        load_weights(model, read_state_dict(path), path)
    except ValueError as error:
        raise UserError(f"--checkpoint {str(checkpoint)!r}: {error}") from error
    return RestoredDense(model.eval(), metadata["model"], metadata["task"], list(metadata["classes"]), img_size,
                         tuple(metadata["mean"]), tuple(metadata["std"]), list(metadata.get("category_ids", [])))
