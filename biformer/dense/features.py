"""A dense model's backbone, built one way for every head: the original BiFormer backbone (`create_backbone`) or
any timm model's feature maps at strides 4-32 (`TimmFeatures`), and the release configs' drop-path rule."""
from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any

import timm
from torch import Tensor, nn

from ..checkpoints.loading import CheckpointReport, check_no_strays, part
from ..checkpoints.weights import check_fits, read_state_dict
from ..errors import UserError
from .backbone import REDUCTIONS, create_backbone
from .names import is_biformer

# drop path of the BiFormer variants the release has no dense configs for (BiFormer-T, nano): ours
OTHER_BIFORMER_DROP_PATH = 0.1


def release_drop_path(backbone: str, release_rate: float | None) -> float:
    """A dense model's backbone drop path: the release config's rate (None: it has none for this backbone),
    OTHER_BIFORMER_DROP_PATH for such a BiFormer, 0 for other backbones."""
    if not is_biformer(backbone):
        return 0.0
    return OTHER_BIFORMER_DROP_PATH if release_rate is None else release_rate


class TimmFeatures(nn.Module):
    """A timm model's feature maps at strides 4, 8, 16, 32: (B, 3, H, W) -> [(B, C_i, H / s_i, W / s_i)].

    checkpoint: the timm classifier's weights to start from (see `load_features_checkpoint`); what was used is in
    `.checkpoint_report`.
    """

    def __init__(self, name: str, checkpoint: str | os.PathLike | None = None, **model_kwargs: Any) -> None:
        super().__init__()
        self.name = name
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
        self.checkpoint_report = None if checkpoint is None else load_features_checkpoint(self, checkpoint)

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = self.model(x)
        picked = [maps[i] for i in self.indices]
        return [m.permute(0, 3, 1, 2) for m in picked] if self.nhwc else picked


def _feature_key_source(key: str, state_dict: dict[str, Tensor]) -> str | None:
    """The classifier's state-dict key of a features_only model's key: the same, or, where timm flattened a
    top-level Sequential into the feature model (convnext's "stem.0" -> "stem_0"), with that "_" a "." again."""
    if key in state_dict:
        return key
    top, _, rest = key.partition(".")
    flattened = re.fullmatch(r"(.+)_(\d+)", top)
    source = f"{flattened[1]}.{flattened[2]}.{rest}" if flattened else None
    return source if source in state_dict else None


def load_features_checkpoint(features: TimmFeatures, path: str | os.PathLike) -> CheckpointReport:
    """Load a timm classifier's checkpoint (a timm or PyTorch file, ours, wrapped in "model" or "state_dict" or
    not) into its feature maps; the classifier's head and the layers after the last map are reported unused.
    CheckpointError naming the keys if the rest does not fit."""
    state_dict = read_state_dict(path)
    sources = {key: _feature_key_source(key, state_dict) for key in features.model.state_dict()}
    usable = {key: state_dict[source] for key, source in sources.items() if source is not None}
    used = set(sources.values())
    unused = Counter(part(key) for key in state_dict if key not in used)
    target = f"the feature maps of {features.name}"
    check_fits(usable, features.model, path, target, "Is it for another model?")
    check_no_strays(state_dict, used, path, target)
    features.model.load_state_dict(usable)
    return CheckpointReport(os.fspath(path), "classification checkpoint", len(usable), dict(unused))


def _check_biformer_only(backbone: str, options: dict[str, Any], n_win: int) -> None:
    """ValueError for a BiFormer-only option set away from its default (n_win: the caller's default)."""
    accepted = {"n_win": (n_win, None), "region_size": (None,), "padding": ("masked",)}
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
    at strides 4-32 with `.out_channels`, `.reductions` and `.checkpoint_report` (what backbone_checkpoint gave).
    n_win, region_size and padding are BiFormer's (ValueError if another backbone is given one away from its
    default; default_n_win: the caller's n_win default)."""
    if is_biformer(backbone):
        return create_backbone(backbone, n_win=n_win, region_size=region_size, padding=padding,
                               checkpoint=backbone_checkpoint, drop_path_rate=drop_path_rate, **model_kwargs)
    _check_biformer_only(backbone, dict(n_win=n_win, region_size=region_size, padding=padding), n_win=default_n_win)
    if drop_path_rate:  # not every timm model takes the argument; 0 is everyone's default
        model_kwargs["drop_path_rate"] = drop_path_rate
    return TimmFeatures(backbone, backbone_checkpoint, **model_kwargs)


def head_and_features(
    name: str,
    heads: tuple[str, ...],
    task: str,
    num_classes: int,
    *,
    default_drop_path: float,
    default_n_win: int,
    drop_path_rate: float | None,
    **backbone_options: Any,
) -> tuple[str, nn.Module]:
    """(head, backbone) of dense model `name` (`<head>_<backbone>`, a head of `heads`): the one construction path
    of the segmentation and detection models. drop_path_rate None takes the model settings'; backbone_options are
    `create_features`'. UserError for an unknown name; ValueError for fewer than one class."""
    from .names import parse_head_name

    head, backbone_name = parse_head_name(name, heads, task)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    features = create_features(backbone_name, default_n_win=default_n_win,
                               drop_path_rate=default_drop_path if drop_path_rate is None else drop_path_rate,
                               **backbone_options)
    return head, features
