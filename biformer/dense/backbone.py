"""The BiFormer dense-prediction backbone: four feature maps at strides 4/8/16/32, each layer-normed.

Also what the dense models (segmentation, detection) share: their `<head>_<backbone>` names, and the
backbone of such a name, BiFormer's (below) or any timm model's `features_only` maps (`TimmFeatures`).

As in the original detection/segmentation code, each stage's output passes through its own
LayerNorm2d ("extra norms", eps 1e-6) before it leaves for the neck, while the un-normed map goes
on to the next stage; the classifier's final norm and head are not part of it.

Shape legend: B batch, C_i channels of stage i, H/W input height/width.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Any

import timm
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from ..checkpoints.loading import CheckpointReport, part
from ..checkpoints.original import checkpoint_filter_fn, split_detection_checkpoint
from ..checkpoints.weights import check_fits, read_state_dict

REDUCTIONS = (4, 8, 16, 32)
# a classification checkpoint's parts that a backbone has no use for: the final norm and the classifier
CLASSIFIER_PARTS = ("norm", "head")


class DenseBackbone(nn.Module):
    """(B, 3, H, W) -> [(B, C_i, ceil(H / s_i), ceil(W / s_i)) for s_i in 4, 8, 16, 32], H, W >= 32.

    Built from a BiFormer classifier's stem and stages; `norms.i` are the original's `extra_norms.i`.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.stem, self.stages = classifier.stem, classifier.stages
        self.out_channels = [info["num_chs"] for info in classifier.feature_info]
        self.reductions = list(REDUCTIONS)
        self.norms = nn.ModuleList(LayerNorm2d(channels, eps=1e-6) for channels in self.out_channels)
        self.checkpoint_report: CheckpointReport | None = None

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        features = []
        for stage, norm in zip(self.stages, self.norms):
            x = stage(x)  # un-normed: the next stage's input
            features.append(norm(x))
        return features


def _layer(key: str) -> str:
    """'norms.2.weight' -> 'norms.2'."""
    return ".".join(key.split(".")[:2])


def load_backbone_checkpoint(backbone: DenseBackbone, path: str | os.PathLike) -> CheckpointReport:
    """Load a classification checkpoint (the original release's or ours) or an original mmdet/mmseg one into
    `backbone`; CheckpointError naming the keys if the rest does not fit exactly."""
    state_dict = read_state_dict(path)
    detection = split_detection_checkpoint(state_dict)
    if detection is not None:
        state_dict, other_parts = detection
        kind = "detection/segmentation checkpoint, its backbone"
        unused: Counter[str] = Counter({part: 0 for part in other_parts})
    else:
        kind, unused = "classification checkpoint", Counter()
    state_dict = checkpoint_filter_fn(state_dict, backbone)
    if detection is None:
        unused.update(part(key) for key in state_dict if part(key) in CLASSIFIER_PARTS)
        state_dict = {key: value for key, value in state_dict.items() if part(key) not in CLASSIFIER_PARTS}
    # a classification checkpoint has no extra norms: they keep their initial values (the identity)
    initial = [] if detection is not None else sorted(
        {_layer(key) for key in backbone.state_dict() if key not in state_dict and part(key) == "norms"})
    check_fits(state_dict, backbone, path, "this backbone", "Is it for another variant?",
               may_miss=lambda key: _layer(key) in initial)
    backbone.load_state_dict(state_dict, strict=False)  # strict but for the keys check_fits lets pass
    return CheckpointReport(os.fspath(path), kind, len(state_dict), dict(unused), initial)


def create_backbone(
    name: str,
    *,
    n_win: int | tuple[int, ...] | None = None,
    region_size: int | tuple[int | None, ...] | None = None,
    padding: str = "masked",
    checkpoint: str | os.PathLike | None = None,
    **model_kwargs: Any,
) -> DenseBackbone:
    """The dense backbone of BiFormer variant `name` (e.g. "biformer_tiny").

    n_win: regions per side in the BRA stages (the original configs: 16 for 1333x800 COCO detection,
        8 for 512x512 ADE20K segmentation); None keeps the variant's (7, its ImageNet setting).
    region_size: tokens per region side (one value, or one per stage); if given, n_win follows from each
        input's size instead, so that the attention's cost stays linear in pixels at any resolution.
    padding: "masked" or "legacy" (the original's `auto_pad=True`, which its dense configs use).
    checkpoint: weights to load (see `load_backbone_checkpoint`); what was used is in `.checkpoint_report`.
    model_kwargs: more arguments of the BiFormer model (drop_path_rate, ...).
    """
    if not name.startswith("biformer") or not timm.is_model(name):
        raise ValueError(f"{name!r} is not a BiFormer variant; choose one of {', '.join(timm.list_models('biformer*'))}")
    for option, value in (("n_win", n_win), ("region_size", region_size)):
        if value is not None:
            model_kwargs[option] = value
    backbone = DenseBackbone(timm.create_model(name, num_classes=0, padding=padding, **model_kwargs))
    if checkpoint is not None:
        backbone.checkpoint_report = load_backbone_checkpoint(backbone, checkpoint)
    return backbone
