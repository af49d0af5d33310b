"""The original BiFormer release's checkpoint formats, both directions, and file conversion.

The release names its classification weights (`{"model": state_dict}` .pth files) differently:

| ours                               | original release                                          |
| ---------------------------------- | --------------------------------------------------------- |
| `stem.*`                           | `downsample_layers.0.*`                                    |
| `stages.i.downsample.*`            | `downsample_layers.i.*`                                    |
| `stages.i.blocks.j.*`              | `stages.i.j.*` (BiFormer-T/S/B), `stages.i.blocks.j.*` (STL) |
| `mlp.fc1`, `mlp.fc2`               | `mlp.0`, `mlp.3` (BiFormer-T/S/B) or `mlp.2` (STL)          |
| BRA `attn.qkv`, `attn.proj`        | `attn.qkv.qkv`, `attn.wo`; in the NCHW refactor (STL-NCHW) the 1x1 convs `attn.qkv_linear`, `attn.output_linear` |

Our layout is recognised by `stem.0.weight`, the original's by `downsample_layers.0.0.weight`.
The original detection/segmentation code (mmdet/mmseg) saves `{"state_dict": {"backbone.<key>", "neck.…",
"decode_head.…" / "bbox_head.…"}}`: its backbone keys are the classification layout plus
`extra_norms.i` (one LayerNorm2d per stage output), which are our dense backbone's `norms.i`.
Values are never cast or copied beyond making them contiguous, so a round trip is bitwise exact.
"""
from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..files import atomic_output
from ..ops import BiLevelRoutingAttention
from .weights import METADATA_KEY, UNRECORDED_TASK, read_metadata, read_state_dict, save_weights

LAYOUTS = ("original", "ours")
OURS_MARKER, ORIGINAL_MARKER = "stem.0.weight", "downsample_layers.0.0.weight"  # a key only that layout has
MM_BACKBONE_PREFIX = "backbone."  # mmdet/mmseg checkpoints: the backbone's keys under this prefix
TORCH_EXTENSIONS = (".pth", ".pt")


@dataclass(frozen=True)
class OriginalLayout:
    """How the original release named one variant's weights."""

    flat_blocks: bool  # "stages.i.j." (BiFormer) rather than "stages.i.blocks.j." (STL)
    mlp_fc2_index: int  # index of the MLP's second Linear in the original nn.Sequential
    nchw: bool  # projections stored as 1x1 convs, BRA layers named qkv_linear/output_linear


def original_layout(model: nn.Module) -> OriginalLayout:
    """The release layout of a BiFormer: its BiFormer-T/S/B classes have the overlapping conv stem, the STL
    classes a patch stem, and only the NCHW refactor applies stage 4's lepe to V (topk -1)."""
    overlapping_stem = len(model.stem) > 2
    nchw = any(getattr(module, "lepe_on", None) == "value" for module in model.modules())
    return OriginalLayout(flat_blocks=overlapping_stem, mlp_fc2_index=3 if overlapping_stem else 2, nchw=nchw)


def _global_stages(model: nn.Module) -> set[int]:
    return {i for i, stage in enumerate(model.stages) if not isinstance(stage.blocks[0].attn, BiLevelRoutingAttention)}


def _original_block_key(rest: str, layout: OriginalLayout, global_stage: bool) -> str:
    """One block-relative key of ours -> the original's name (rest is after 'stages.i.blocks.j.')."""
    rest = re.sub(r"^mlp\.fc1\.", "mlp.0.", rest)
    rest = re.sub(r"^mlp\.fc2\.", f"mlp.{layout.mlp_fc2_index}.", rest)
    if not global_stage and rest.startswith("attn."):
        names = ("qkv_linear.", "output_linear.") if layout.nchw else ("qkv.qkv.", "wo.")
        rest = re.sub(r"^attn\.qkv\.", "attn." + names[0], rest)
        rest = re.sub(r"^attn\.proj\.", "attn." + names[1], rest)
    return rest


def to_original_state_dict(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Our state dict of `model` (a BiFormer) -> the original release's keys and shapes."""
    layout, global_stages = original_layout(model), _global_stages(model)
    converted = {}
    for key, value in state_dict.items():
        if key.startswith("stem."):
            key = "downsample_layers.0." + key[len("stem."):]
        elif match := re.match(r"stages\.(\d+)\.downsample\.(.*)", key):
            key = f"downsample_layers.{match[1]}.{match[2]}"
        elif match := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", key):
            stage, block, rest = int(match[1]), match[2], match[3]
            rest = _original_block_key(rest, layout, stage in global_stages)
            key = f"stages.{stage}.{block}.{rest}" if layout.flat_blocks else f"stages.{stage}.blocks.{block}.{rest}"
            if layout.nchw and value.dim() == 2:
                value = value[:, :, None, None]  # Linear -> 1x1 conv
        converted[key] = value
    return converted


# the original BRA layers' projection names -> ours (the legacy layer, then the NCHW refactor)
_ATTENTION_NAMES = {"qkv.qkv.": "qkv.", "wo.": "proj.", "qkv_linear.": "qkv.", "output_linear.": "proj."}


def _our_block_key(rest: str) -> str:
    """One block-relative key of the original's -> ours (rest is after 'stages.i.j.' or 'stages.i.blocks.j.')."""
    rest = re.sub(r"^mlp\.0\.", "mlp.fc1.", rest)
    rest = re.sub(r"^mlp\.[23]\.", "mlp.fc2.", rest)
    for old, new in _ATTENTION_NAMES.items():
        if rest.startswith("attn." + old):
            return "attn." + new + rest[len("attn." + old):]
    return rest


def attention_layer_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """One original BRA layer's state dict (keys relative to the layer) in our names; 1x1 convs as Linear weights."""
    converted = {}
    for key, value in state_dict.items():
        key = _our_block_key("attn." + key).removeprefix("attn.")
        converted[key] = value.flatten(1) if value.dim() == 4 and value.shape[2:] == (1, 1) else value
    return converted


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """An original release state dict (or `{"model": state_dict}`) -> our layout (timm's pretrained filter).

    State dicts already in our layout pass through unchanged. 1x1 convs of the NCHW refactor become
    Linear weights; `num_batches_tracked` buffers are kept if present.
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    if OURS_MARKER in state_dict:
        return dict(state_dict)
    own = model.state_dict()
    converted = {}
    for key, value in state_dict.items():
        if key.startswith("downsample_layers.0."):
            key = "stem." + key[len("downsample_layers.0."):]
        elif match := re.match(r"downsample_layers\.(\d+)\.(.*)", key):
            key = f"stages.{match[1]}.downsample.{match[2]}"
        elif match := re.match(r"stages\.(\d+)\.(?:blocks\.)?(\d+)\.(.*)", key):
            key = f"stages.{match[1]}.blocks.{match[2]}.{_our_block_key(match[3])}"
        target = own.get(key)
        if target is not None and target.dim() == 2 and value.dim() == 4 and value.shape[2:] == (1, 1):
            value = value.flatten(1)  # 1x1 conv -> Linear
        converted[key] = value
    return converted


def split_detection_checkpoint(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]] | None:
    """(the backbone's state dict, extra norms named `norms.i`, and the other parts' names) of an mmdet/mmseg
    state dict; None if `state_dict` is not one (it has no `backbone.` keys)."""
    if not any(key.startswith(MM_BACKBONE_PREFIX) for key in state_dict):
        return None
    backbone = {re.sub(r"^extra_norms\.(\d+)\.", r"norms.\1.", key.removeprefix(MM_BACKBONE_PREFIX)): value
                for key, value in state_dict.items() if key.startswith(MM_BACKBONE_PREFIX)}
    others = sorted({key.split(".", 1)[0] for key in state_dict if not key.startswith(MM_BACKBONE_PREFIX)})
    return backbone, others


def detect_layout(state_dict: dict[str, Tensor]) -> str:
    if OURS_MARKER in state_dict:
        return "ours"
    if ORIGINAL_MARKER in state_dict:
        return "original"
    raise CheckpointError(f"the file is neither a BiFormer checkpoint in the original layout ({ORIGINAL_MARKER}) "
                          f"nor in ours ({OURS_MARKER})")


def _expected_shapes(model_name: str, num_classes: int, layout: str) -> tuple[nn.Module, dict[str, torch.Size]]:
    """A meta-device model and the keys/shapes its state dict has in `layout` (num_batches_tracked aside)."""
    import timm

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
    import timm

    matches = [
        name for name in timm.list_models("biformer*")
        if not _mismatches(state_dict, _expected_shapes(name, _num_classes(state_dict), layout)[1])
    ]
    if len(matches) != 1:
        found = "no BiFormer variant" if not matches else f"several variants ({', '.join(matches)})"
        raise CheckpointError(f"{found} matches the file's keys and shapes; name the model with --model")
    return matches[0]


def convert_state_dict(state_dict: dict[str, Tensor], model_name: str, to: str) -> dict[str, Tensor]:
    """Convert to layout `to`; CheckpointError if the result does not fit model_name exactly."""
    if to not in LAYOUTS:
        raise ValueError(f"to must be one of {LAYOUTS}, got {to!r}")
    model, expected = _expected_shapes(model_name, _num_classes(state_dict), to)
    if detect_layout(state_dict) != to:
        state_dict = checkpoint_filter_fn(state_dict, model) if to == "ours" else to_original_state_dict(state_dict, model)
    problems = _mismatches(state_dict, expected)
    if problems:
        shown = "; ".join(problems[:6]) + ("; ..." if len(problems) > 6 else "")
        raise CheckpointError(f"the checkpoint does not fit {model_name} ({len(problems)} problems: {shown}); "
                              "is --model right?")
    return {k: v.contiguous() for k, v in state_dict.items()}


def _format_of(path: str) -> str:
    extension = os.path.splitext(path)[1].lower()
    if extension == ".safetensors":
        return "safetensors"
    if extension in TORCH_EXTENSIONS:
        return "torch"
    raise CheckpointError(f"{path!r}: use a .safetensors, .pth or .pt file name")


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

    The target keeps the source's metadata (classes, preprocessing, image size) and names the model, so eval,
    predict and visualize read it without --model: a .safetensors as our weight files do (`save_weights`), a .pth
    as JSON text beside the original release's {"model": state_dict}. Raises FileNotFoundError or CheckpointError
    (the target is the source, unsafe or corrupt pickle, unknown layout, no model fits).
    """
    import timm

    source_format, target_format = _format_of(source), _format_of(target)  # bad names fail before any reading
    if os.path.exists(target) and os.path.samefile(source, target):
        raise CheckpointError(f"the output {target!r} is the input file: converting in place would lose the "
                              "original; write to another file")
    state_dict = read_state_dict(source)
    source_layout = detect_layout(state_dict)
    to = to or target_layout(source_format, target_format, source_layout)
    if model_name is None:
        model_name = infer_model(state_dict, source_layout)
    elif not timm.is_model(model_name):
        raise CheckpointError(f"unknown model {model_name!r}; choose one of {', '.join(timm.list_models('biformer*'))}")
    converted = convert_state_dict(state_dict, model_name, to)
    metadata = {key: value for key, value in read_metadata(source).items() if key != "format"}
    metadata = {"task": UNRECORDED_TASK, **metadata, "model": model_name, "layout": to}
    if target_format == "safetensors":
        save_weights(target, converted, metadata)
    else:
        with atomic_output(target) as temp:  # the original release's file structure, and ours beside it
            torch.save({"model": converted, METADATA_KEY: json.dumps(metadata)}, temp)
    return model_name, source_layout, to


# ----------------------------------------------------------------------------------------------
# Where timm looks for pretrained weights: a file given by the user, or the release's URL
# ----------------------------------------------------------------------------------------------

def _offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ("HF_HUB_OFFLINE", "TIMM_OFFLINE"))


def _host_reachable(url: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((urlparse(url).hostname, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_release_source(variant: str, pretrained_cfg: Any, pretrained_cfg_overlay: dict | None) -> None:
    """Fail fast, with instructions, when pretrained weights can neither be read from a file nor downloaded."""
    from timm.models import PretrainedCfg, get_pretrained_cfg

    cfg = pretrained_cfg or get_pretrained_cfg(variant)
    if isinstance(cfg, PretrainedCfg):
        cfg = cfg.to_dict()
    cfg = {**(cfg or {}), **(pretrained_cfg_overlay or {})}
    if cfg.get("file"):
        folder = cfg.get("source") == "local-dir"  # timm.create_model("local-dir:FOLDER"): a hub folder's weights
        if not (os.path.isdir if folder else os.path.isfile)(cfg["file"]):
            raise FileNotFoundError(f"pretrained {'folder' if folder else 'file'} {cfg['file']!r} for {variant} "
                                    f"does not exist")
        return
    hint = (
        f"download the original release file ({cfg.get('url') or 'see README'}) and pass it with "
        f"timm.create_model({variant.split('.')[0]!r}, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))"
    )
    if not cfg.get("url"):
        raise RuntimeError(f"{variant} has no released weights; train it or {hint}")
    if _offline() or not _host_reachable(cfg["url"]):
        raise RuntimeError(f"cannot download pretrained weights for {variant} (offline or host unreachable); {hint}")
