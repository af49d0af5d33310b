"""Loading a weights file into a model, whichever of our layout or the original release's it has: strictly
(`load_weights`), or as pretrained weights to fine-tune from (`load_pretrained_classifier`), with a report of
what was used."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from torch import Tensor, nn

from ..errors import CheckpointError
from .inflation import inflate_state_dict
from .original import ORIGINAL_MARKER, checkpoint_filter_fn
from .weights import check_fits, read_metadata, read_state_dict


def pretrained_normalization(path: str | os.PathLike) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where from) of the inputs the model in a weights file was trained on: its recorded statistics
    (ours), else ImageNet's (the release's, timm's and mmdet/mmseg files record none and were trained on it)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    metadata = read_metadata(path)
    if "mean" in metadata and "std" in metadata:
        return tuple(metadata["mean"]), tuple(metadata["std"]), f"--pretrained {os.fspath(path)}"
    return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, f"ImageNet's: --pretrained {os.fspath(path)} records none"


def load_weights(model: nn.Module, state_dict: dict[str, Tensor], source: str | os.PathLike) -> nn.Module:
    """Load a state dict read from `source` (ours or in the original release layout) strictly into model.

    Raises CheckpointError (a ValueError) listing missing/unexpected keys or mismatched shapes:
    never a partial load.
    """
    if ORIGINAL_MARKER in state_dict:
        state_dict = checkpoint_filter_fn(state_dict, model)
    check_fits(state_dict, model, source, type(model).__name__, "Is it for another model or number of classes?")
    model.load_state_dict(state_dict)
    return model


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint file (.pth or .safetensors, ours or the original release's) strictly into model."""
    return load_weights(model, read_state_dict(path), path)


@dataclass(frozen=True)
class CheckpointReport:
    """What a model (or a dense model's backbone) took from a checkpoint file, and what it left."""

    path: str
    kind: str
    loaded: int
    unused: dict[str, int] = field(default_factory=dict)  # part of the file -> tensors not used
    initial: list[str] = field(default_factory=list)  # the model's layers kept at their initialization
    why_initial: str = "weight 1, bias 0"  # why those keep their initial values

    def __str__(self) -> str:
        text = f"{self.path} ({self.kind}): {self.loaded} tensors loaded"
        if self.unused:
            text += "; not used: " + ", ".join(f"{part} ({count})" for part, count in self.unused.items())
        if self.initial:
            text += f"; at their initial values ({self.why_initial}): {', '.join(self.initial)}"
        return text

    def as_metadata(self) -> dict[str, Any]:
        return asdict(self)


def part(key: str) -> str:
    """'head.weight' -> 'head': the top-level module a state-dict key belongs to."""
    return key.split(".", 1)[0]


def check_no_strays(state_dict: dict[str, Tensor], used: set[str], path: str | os.PathLike, target: str) -> None:
    """CheckpointError for the file's tensors left unused inside a part of the model that was loaded: a deeper
    or wider variant of the model (resnet34's blocks in a resnet18), not a part the model has no use for."""
    loaded_parts = {part(key) for key in used}
    strays = sorted(key for key in state_dict if key not in used and part(key) in loaded_parts)
    if strays:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} does not fit {target}: {len(strays)} unexpected keys "
                              f"({', '.join(strays[:8])}{', ...' if len(strays) > 8 else ''}). Is it for another model?")


def classifier_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of a timm classifier's head (its pretrained_cfg names the module, e.g. "head.fc")."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    prefixes = tuple(f"{name}." for name in ((names,) if isinstance(names, str) else names))
    return [key for key in model.state_dict() if key.startswith(prefixes)]


def load_pretrained_classifier(model: nn.Module, path: str | os.PathLike,
                               classes: Sequence[str] | None = None) -> CheckpointReport:
    """Load a classifier's checkpoint (ours, the original release's, or timm's/PyTorch's, wrapped in "model" or
    "state_dict" or not) into a timm classifier to fine-tune it. The head keeps its initialization where the
    file's has another class count (or none), or where the file records class names other than `classes` (the
    run's, when given): a head for the digits 0-9 is no start for ten other classes. The file's tensors the model
    has no place for are reported unused. CheckpointError naming the keys if anything else does not fit."""
    state_dict = read_state_dict(path)
    recorded = read_metadata(path).get("classes")
    if ORIGINAL_MARKER in state_dict:
        state_dict = checkpoint_filter_fn(state_dict, model)
    kind, adapted = "classification checkpoint", ""
    first_conv = f"{getattr(model, 'pretrained_cfg', {}).get('first_conv')}.weight"
    own_first, file_first = model.state_dict().get(first_conv), state_dict.get(first_conv)
    if own_first is not None and file_first is not None and file_first.dim() == 4 and own_first.shape[1] != file_first.shape[1]:
        from timm.models import adapt_input_conv  # RGB weights for other input channels, as timm's pretrained loading

        state_dict = {**state_dict, first_conv: adapt_input_conv(own_first.shape[1], file_first)}
        adapted = f", input conv adapted from {file_first.shape[1]} to {own_first.shape[1]} channels"
    if getattr(model, "spatial_dims", 2) == 3:  # a clip or volume model from an image model's file
        state_dict, inflated = inflate_state_dict(state_dict, model)
        if inflated:
            kind = f"image classification checkpoint, {len(inflated)} conv kernels inflated over time (or depth)"
    kind += adapted
    own = model.state_dict()
    head = classifier_keys(model)
    misfit = [key for key in head if key not in state_dict or state_dict[key].shape != own[key].shape]
    other_classes = classes is not None and recorded is not None and list(recorded) != list(classes)
    refitted = head if other_classes else misfit
    unused = Counter(part(key) for key in state_dict if key not in own or key in refitted)
    usable = {key: value for key, value in state_dict.items() if key in own and key not in refitted}
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    check_fits(usable, model, path, f"model {name}", "Is it for another model?", may_miss=lambda key: key in refitted)
    check_no_strays(state_dict, set(usable) | set(refitted), path, f"model {name}")
    model.load_state_dict(usable, strict=False)  # strict but for the head, which check_fits let pass
    if other_classes and not misfit:
        why = f"the file's classifier is for other classes ({_few(recorded)}, not {_few(classes)})"
    else:
        why = f"the file's classifier does not fit {own[head[0]].shape[0]} classes" if head else ""
    return CheckpointReport(os.fspath(path), kind, len(usable), dict(unused),
                            sorted({key.rsplit(".", 1)[0] for key in refitted}), why)


def _few(names: Sequence[str]) -> str:
    """'0, 1, 2, ...': the first three class names, enough to tell two class lists apart."""
    return ", ".join(map(str, names[:3])) + (", ..." if len(names) > 3 else "")
