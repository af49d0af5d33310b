"""A ready-to-run segmentation model from a weights file of `biformer train`, for eval and predict."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..checkpoints.files import load_weights, read_metadata, read_state_dict
from ..errors import UserError
from .segmentation import create_segmentation_model, is_segmentation_model


@dataclass
class RestoredSegmentation:
    model: nn.Module  # in eval mode
    model_name: str
    classes: list[str]
    img_size: int  # the validation scale: images are resized so that their shorter side has this length
    mean: tuple[float, ...]
    std: tuple[float, ...]


def is_segmentation_checkpoint(checkpoint: str | os.PathLike, model_name: str | None = None) -> bool:
    """Whether a weights file (or the --model given for it) is a segmentation model's."""
    if model_name is not None:
        return is_segmentation_model(model_name)
    return Path(checkpoint).is_file() and read_metadata(checkpoint).get("task") == "segmentation"


def restore_segmentation_model(checkpoint: str | os.PathLike, img_size: int | None = None) -> RestoredSegmentation:
    """The model of a segmentation weights file written by `biformer train`, with its classes and preprocessing."""
    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"--checkpoint {str(checkpoint)!r} does not exist")
    metadata = read_metadata(path)
    missing = [key for key in ("model", "classes", "img_size", "mean", "std") if key not in metadata]
    if missing:
        raise UserError(f"--checkpoint {str(checkpoint)!r} lacks {', '.join(missing)} in its metadata: segmentation "
                        "models are restored from the .safetensors files that `biformer train` writes")
    model = create_segmentation_model(metadata["model"], len(metadata["classes"]))
    try:
        load_weights(model, read_state_dict(path), path)
    except ValueError as error:
        raise UserError(f"--checkpoint {str(checkpoint)!r}: {error}") from error
    return RestoredSegmentation(model.eval(), metadata["model"], list(metadata["classes"]),
                                img_size or metadata["img_size"], tuple(metadata["mean"]), tuple(metadata["std"]))
