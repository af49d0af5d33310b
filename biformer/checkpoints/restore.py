"""A ready-to-run model from a checkpoint file (ours or an original release file), for eval, predict and visualize."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from timm.data import ImageNetInfo, resolve_data_config
from torch import Tensor, nn

from ..errors import UserError
from .files import load_weights, read_metadata, read_state_dict


@dataclass
class RestoredModel:
    model: nn.Module
    model_name: str
    classes: list[str]
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    classes_recorded: bool  # class names came from the checkpoint (our trainer's), not a default


def restore_model(
    checkpoint: str, model_name: str | None, img_size: int | None = None, **model_kwargs: Any
) -> RestoredModel:
    """The checkpoint's model in eval mode, with its class names and preprocessing; model_kwargs
    go to timm.create_model (e.g. padding).

    Our .safetensors files (from `train` or `convert`) name their model, and our trainer's also carry
    classes and preprocessing; for other files (e.g. an original release .pth) pass --model. They get
    timm's config for that model and as many classes as their classifier has (ImageNet's names for 1000).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"--checkpoint {checkpoint!r} does not exist")
    metadata = read_metadata(path)
    model_name = model_name or metadata.get("model")
    if not model_name:
        raise UserError(f"--checkpoint {checkpoint!r} does not name its model; pass --model")
    if model_name not in timm.list_models(model_name):
        raise UserError(f"--model {model_name!r} is not a registered timm model")
    classes = metadata.get("classes")
    state_dict = read_state_dict(path)  # read once: it also gives the class count of files without metadata
    model_kwargs = {**metadata.get("model_kwargs", {}), **model_kwargs}  # as trained (--model-kwargs), then ours
    model = timm.create_model(model_name, num_classes=len(classes) if classes else _head_size(state_dict, model_name),
                              **model_kwargs)
    try:
        load_weights(model, state_dict, path)
    except ValueError as error:
        raise UserError(f"--checkpoint {checkpoint!r} for --model {model_name}: {error}") from error
    classes_recorded = classes is not None
    if classes is None:
        count = model.num_classes
        classes = (ImageNetInfo().label_names() if count == 1000 else [str(i) for i in range(count)])
    if "img_size" in metadata:
        size, mean, std, crop = metadata["img_size"], metadata["mean"], metadata["std"], metadata["crop_pct"]
    else:
        config = resolve_data_config({}, model=model)
        size, mean, std, crop = config["input_size"][-1], config["mean"], config["std"], config["crop_pct"]
    return RestoredModel(model.eval(), model_name, list(classes), img_size or size, tuple(mean), tuple(std), crop,
                         classes_recorded)


def _head_size(state_dict: dict[str, Tensor], model_name: str) -> int:
    """Output size of the classifier in a checkpoint without metadata (the model's default if absent)."""
    classifier = timm.models.get_pretrained_cfg_value(model_name, "classifier") or "head"
    default = timm.models.get_pretrained_cfg_value(model_name, "num_classes") or 1000
    head = state_dict.get(f"{classifier}.weight")
    return head.shape[0] if head is not None and head.ndim >= 1 else default
