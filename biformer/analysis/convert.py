"""Checkpoint conversion between the original release layout and ours, .pth or .safetensors.

Values are never cast or copied beyond making them contiguous, so a round trip is bitwise exact.
The architecture is inferred by matching every key and shape against the registered BiFormer
variants (built on the meta device, so nothing is allocated), or named explicitly.
"""
from __future__ import annotations

import os

import timm
import torch
from safetensors.torch import save_file
from torch import Tensor

from ..models import checkpoint_filter_fn, read_state_dict, to_original_state_dict
from ..files import atomic_output

LAYOUTS = ("original", "ours")
TORCH_EXTENSIONS = (".pth", ".pt")


def detect_layout(state_dict: dict[str, Tensor]) -> str:
    if "stem.0.weight" in state_dict:
        return "ours"
    if "downsample_layers.0.0.weight" in state_dict:
        return "original"
    raise ValueError("the file is neither a BiFormer checkpoint in the original layout (downsample_layers.0.0.weight) "
                     "nor in ours (stem.0.weight)")


def _expected_shapes(model_name: str, num_classes: int, layout: str) -> tuple[torch.nn.Module, dict[str, torch.Size]]:
    """A meta-device model and the keys/shapes its state dict has in `layout` (num_batches_tracked aside)."""
    with torch.device("meta"):
        model = timm.create_model(model_name, num_classes=num_classes)
    state_dict = model.state_dict()
    if layout == "original":
        state_dict = to_original_state_dict(state_dict, model)
    return model, {k: v.shape for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}


def _mismatches(state_dict: dict[str, Tensor], expected: dict[str, torch.Size]) -> list[str]:
    present = {k: v.shape for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    problems = [f"missing {k}" for k in sorted(set(expected) - set(present))]
    problems += [f"unexpected {k}" for k in sorted(set(present) - set(expected))]
    problems += [f"{k}: {tuple(present[k])} vs {tuple(expected[k])}" for k in sorted(set(present) & set(expected))
                 if present[k] != expected[k]]
    return problems


def _num_classes(state_dict: dict[str, Tensor]) -> int:
    head = state_dict.get("head.weight")
    return head.shape[0] if head is not None else 0


def infer_model(state_dict: dict[str, Tensor], layout: str) -> str:
    """The registered biformer_* variant whose keys and shapes the state dict has exactly."""
    matches = [
        name for name in timm.list_models("biformer*")
        if not _mismatches(state_dict, _expected_shapes(name, _num_classes(state_dict), layout)[1])
    ]
    if len(matches) != 1:
        found = "no BiFormer variant" if not matches else f"several variants ({', '.join(matches)})"
        raise ValueError(f"{found} matches the file's keys and shapes; name the model with --model")
    return matches[0]


def convert_state_dict(state_dict: dict[str, Tensor], model_name: str, to: str) -> dict[str, Tensor]:
    """Convert to layout `to`; ValueError if the result does not fit model_name exactly."""
    if to not in LAYOUTS:
        raise ValueError(f"to must be one of {LAYOUTS}, got {to!r}")
    model, expected = _expected_shapes(model_name, _num_classes(state_dict), to)
    source = detect_layout(state_dict)
    if source != to:
        state_dict = checkpoint_filter_fn(state_dict, model) if to == "ours" else to_original_state_dict(state_dict, model)
    problems = _mismatches(state_dict, expected)
    if problems:
        shown = "; ".join(problems[:6]) + ("; ..." if len(problems) > 6 else "")
        raise ValueError(f"the checkpoint does not fit {model_name} ({len(problems)} problems: {shown}); "
                         "is --model right?")
    return {k: v.contiguous() for k, v in state_dict.items()}


def _format_of(path: str) -> str:
    extension = os.path.splitext(path)[1].lower()
    if extension == ".safetensors":
        return "safetensors"
    if extension in TORCH_EXTENSIONS:
        return "torch"
    raise ValueError(f"{path!r}: use a .safetensors, .pth or .pt file name")


def target_layout(source_format: str, target_format: str, source_layout: str) -> str:
    """Release .pth -> our .safetensors and back; otherwise the layout the input is not in."""
    formats = (source_format, target_format)
    if formats == ("torch", "safetensors"):
        return "ours"
    if formats == ("safetensors", "torch"):
        return "original"
    return "ours" if source_layout == "original" else "original"


def convert_file(source: str, target: str, to: str | None = None, model_name: str | None = None) -> tuple[str, str, str]:
    """Convert a checkpoint file; returns (model name, source layout, target layout).

    Raises FileNotFoundError / ValueError (unsafe or corrupt pickle, unknown layout, no model fits).
    """
    source_format, target_format = _format_of(source), _format_of(target)  # bad names fail before any reading
    state_dict = read_state_dict(source)
    source_layout = detect_layout(state_dict)
    to = to or target_layout(source_format, target_format, source_layout)
    if model_name is None:
        model_name = infer_model(state_dict, source_layout)
    elif not timm.is_model(model_name):
        raise ValueError(f"unknown model {model_name!r}; choose one of {', '.join(timm.list_models('biformer*'))}")
    converted = convert_state_dict(state_dict, model_name, to)
    with atomic_output(target) as temp:
        if target_format == "safetensors":
            save_file(converted, temp, metadata={"format": "pt", "model": model_name, "layout": to})
        else:
            torch.save({"model": converted}, temp)  # the original release's file structure
    return model_name, source_layout, to
