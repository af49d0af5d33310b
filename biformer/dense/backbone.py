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
from dataclasses import dataclass, field
from typing import Any

import timm
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from ..checkpoints.files import check_fits, read_state_dict
from ..checkpoints.original import checkpoint_filter_fn, split_detection_checkpoint
from ..errors import UserError

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


@dataclass(frozen=True)
class CheckpointReport:
    """What a backbone took from a checkpoint file, and what it left."""

    path: str
    kind: str
    loaded: int
    unused: dict[str, int] = field(default_factory=dict)  # part of the file -> tensors not used
    initial: list[str] = field(default_factory=list)  # backbone tensors kept at their initial values

    def __str__(self) -> str:
        text = f"{self.path} ({self.kind}): {self.loaded} tensors loaded"
        if self.unused:
            text += "; not used: " + ", ".join(f"{part} ({count})" for part, count in self.unused.items())
        if self.initial:
            text += f"; at their initial values (weight 1, bias 0): {', '.join(self.initial)}"
        return text


def _part(key: str) -> str:
    return key.split(".", 1)[0]


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
        unused.update(_part(key) for key in state_dict if _part(key) in CLASSIFIER_PARTS)
        state_dict = {key: value for key, value in state_dict.items() if _part(key) not in CLASSIFIER_PARTS}
    # a classification checkpoint has no extra norms: they keep their initial values (the identity)
    initial = [] if detection is not None else sorted(
        {_layer(key) for key in backbone.state_dict() if key not in state_dict and _part(key) == "norms"})
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


# drop path of the BiFormer variants the release has no dense configs for (BiFormer-T, nano): ours
OTHER_BIFORMER_DROP_PATH = 0.1


def is_biformer(backbone: str) -> bool:
    return backbone.startswith("biformer")


def recipe_drop_path(backbone: str, release_rate: float | None) -> float:
    """A dense recipe's backbone drop path: the release config's rate (None: it has none for this backbone),
    OTHER_BIFORMER_DROP_PATH for such a BiFormer, 0 for other backbones."""
    if not is_biformer(backbone):
        return 0.0
    return OTHER_BIFORMER_DROP_PATH if release_rate is None else release_rate


def split_head_name(name: str, heads: tuple[str, ...]) -> tuple[str, str] | None:
    """'upernet_biformer_tiny' -> ('upernet', 'biformer_tiny') for a head in `heads`; None without such a prefix.

    Whether timm knows the backbone is not checked.
    """
    head, _, backbone = name.partition("_")
    return (head, backbone) if head in heads and backbone else None


def head_forms(heads: tuple[str, ...]) -> str:
    """('sfpn', 'upernet') -> 'sfpn_<backbone>, upernet_<backbone>': the accepted name forms, for messages."""
    return ", ".join(f"{head}_<backbone>" for head in heads)


def is_head_model(name: str, heads: tuple[str, ...]) -> bool:
    """A head prefix of `heads` and a backbone that timm knows (BiFormer variants included)."""
    parts = split_head_name(name, heads)
    return parts is not None and timm.is_model(parts[1])


def parse_head_name(name: str, heads: tuple[str, ...], task: str) -> tuple[str, str]:
    """(head, backbone) of a `task` model's name; UserError without a head of `heads` or a backbone timm knows."""
    parts = split_head_name(name, heads)
    if parts is None or not timm.is_model(parts[1]):
        unknown = f"unknown backbone {parts[1]!r}" if parts else "no head prefix"
        raise UserError(
            f"{task} model {name!r}: {unknown}; use HEAD_BACKBONE with HEAD one of {', '.join(heads)} "
            "and BACKBONE a BiFormer variant (biformer_tiny, biformer_small, biformer_base) or a timm model with "
            f"feature maps at strides 4-32 (resnet18, convnext_tiny, ...), e.g. {heads[-1]}_biformer_small")
    return parts


class TimmFeatures(nn.Module):
    """A timm model's feature maps at strides 4, 8, 16, 32: (B, 3, H, W) -> [(B, C_i, H / s_i, W / s_i)]."""

    def __init__(self, name: str, **model_kwargs: Any) -> None:
        super().__init__()
        try:
            self.model = timm.create_model(name, features_only=True, pretrained=False, **model_kwargs)
        except RuntimeError as error:  # timm's answer for a model without feature extraction
            raise UserError(f"backbone {name!r} cannot give feature maps ({error}); choose another timm model") from None
        info = self.model.feature_info
        reductions = info.reduction()
        missing = [stride for stride in REDUCTIONS if stride not in reductions]
        if missing:
            raise UserError(
                f"backbone {name!r} has no feature map at stride {', '.join(map(str, missing))} (its maps: strides "
                f"{reductions}); choose a backbone with maps at strides 4, 8, 16 and 32 (a CNN or a hierarchical "
                "transformer such as resnet18, convnext_tiny, swin_tiny_patch4_window7_224)")
        # the deepest map at each stride
        self.indices = [max(i for i, r in enumerate(reductions) if r == stride) for stride in REDUCTIONS]
        self.out_channels = [info.channels()[i] for i in self.indices]
        self.reductions = list(REDUCTIONS)
        self.nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"  # swin and its kin

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = self.model(x)
        picked = [maps[i] for i in self.indices]
        return [m.permute(0, 3, 1, 2) for m in picked] if self.nhwc else picked


def _check_biformer_only(backbone: str, options: dict[str, Any], n_win: int) -> None:
    """ValueError for a BiFormer-only option set away from its default (n_win: the caller's default)."""
    accepted = {"n_win": (n_win, None), "region_size": (None,), "padding": ("masked",), "backbone_checkpoint": (None,)}
    for option, value in options.items():
        if value not in accepted[option]:
            raise ValueError(f"{option}={value!r} applies to BiFormer backbones only; {backbone!r} takes no {option}")


def create_features(
    backbone: str,
    *,
    n_win: int | tuple[int, ...] | None,
    default_n_win: int,
    region_size: int | tuple[int | None, ...] | None,
    padding: str,
    backbone_checkpoint: str | os.PathLike | None,
    drop_path_rate: float,
    **model_kwargs: Any,
) -> nn.Module:
    """A dense model's backbone: `create_backbone`'s for a BiFormer variant, else `TimmFeatures`; both give maps
    at strides 4-32 with `.out_channels` and `.reductions`. n_win, region_size, padding and backbone_checkpoint
    are BiFormer's (ValueError if another backbone is given one away from its default; default_n_win: the
    caller's n_win default)."""
    if is_biformer(backbone):
        return create_backbone(backbone, n_win=n_win, region_size=region_size, padding=padding,
                               checkpoint=backbone_checkpoint, drop_path_rate=drop_path_rate, **model_kwargs)
    _check_biformer_only(backbone, dict(n_win=n_win, region_size=region_size, padding=padding,
                                        backbone_checkpoint=backbone_checkpoint), n_win=default_n_win)
    if drop_path_rate:  # not every timm model takes the argument; 0 is everyone's default
        model_kwargs["drop_path_rate"] = drop_path_rate
    return TimmFeatures(backbone, **model_kwargs)
