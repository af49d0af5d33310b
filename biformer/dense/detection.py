"""Object detection and instance segmentation on BiFormer or any timm backbone: RetinaNet and Mask R-CNN,
the paper's COCO models, and FCOS, built from torchvision's `RetinaNet`, `MaskRCNN` and `FCOS`.

A model is named `<head>_<backbone>`: `retinanet_biformer_small`, `maskrcnn_biformer_base`, `retinanet_resnet18`,
`maskrcnn_convnext_tiny`, ... A `biformer*` backbone is `create_backbone`'s (its stage maps pass through the
original's extra norms); any other timm model gives its `features_only` maps at strides 4, 8, 16, 32
(`TimmFeatures`, as for segmentation).

Necks, as in the original mmdet configs (torchvision's `FeaturePyramidNetwork`, 256 channels):
  - RetinaNet: FPN over the stride-8/16/32 maps (mmdet's start_level=1) plus P6 = conv3x3/s2 of the
    stride-32 *input* map and P7 = conv3x3/s2 of P6 (mmdet's add_extra_convs='on_input' with its default
    relu_before_extra_convs=False); 5 levels P3-P7, strides 8-128. torchvision's `LastLevelP6P7` puts a
    ReLU between P6 and P7 (and reads P5 when the channel counts match), so `InputP6P7` is ours.
  - FCOS (no BiFormer config; mmdet's FCOS configs): the same levels P3-P7, but P6 = conv3x3/s2 of the FPN's
    P5 *output* and a ReLU before P7 (add_extra_convs='on_output', relu_before_extra_convs=True), which is
    torchvision's `LastLevelP6P7` with 256 input channels.
  - Mask R-CNN: FPN over the stride-4..32 maps plus P6 = P5 subsampled (max pool 1, stride 2,
    `LastLevelMaxPool`, as mmdet's num_outs=5 without extra convs); 5 levels P2-P6, strides 4-64.
Anchors and RoI poolers are torchvision's defaults, which match those levels: RetinaNet 3 scales x 3 ratios
from 32 to 512 (P3-P7); Mask R-CNN RPN 1 scale x 3 ratios from 32 to 512 (P2-P6), RoIAlign 7x7 (boxes) and
14x14 (masks) over P2-P5 with the FPN paper's level mapping (the same as mmdet's finest_scale=56).

Classes: labels given to the model (and returned by it) are 1..K for every head. Mask R-CNN's classifier has
K + 1 outputs, 0 the background (torchvision's convention). RetinaNet's and FCOS's classifiers have K sigmoid
outputs, as mmdet's: the labels are shifted to 0..K-1 inside (`SigmoidClasses`) and back to 1..K in their
detections, so no output is spent on a class that never occurs. Training labels outside 1..K are refused.

Backbone BatchNorms (BiFormer's stem and downsampling layers; a timm CNN's) of a backbone that starts from a
checkpoint stay in eval mode in training: running statistics frozen, affine parameters trained — the
original's `norm_eval=True` with `disable_bn_grad=False`, which keeps pretrained statistics from drifting
on small per-GPU batches. A backbone trained from scratch has no statistics worth keeping, so its
BatchNorms train as usual (torchvision's rule: `FrozenBatchNorm2d` only with pretrained weights);
`norm_eval=` overrides either default. mmdet's ResNet configs also freeze the stem and first stage
(frozen_stages=1); timm backbones here freeze nothing more.

Where torchvision's heads differ from mmdet's (the original's configs, mmdet 2.x):
  RetinaNet: same head (4 conv3x3+ReLU per branch, prior 0.01), sigmoid focal loss (alpha 0.25, gamma 2),
    L1 box loss on deltas with unit coder weights, 0.5/0.4 IoU matching with low-quality matches;
    torchvision normalizes both losses by each image's positives and averages the images (mmdet: divides by
    the batch's positives); anchor sizes are truncated to integers (32, 40, 50 instead of 32, 40.3, 50.8).
    Inference: 1000 candidates per level, score > 0.05, class-wise NMS 0.5, and 100 detections per image
    (set here as mmdet's max_per_img; torchvision's default is 300).
  FCOS: torchvision's is mmdet's FCOS with its "tricks" (GroupNorm heads, centerness on the regression
    branch, center sampling radius 1.5, GIoU box loss, normalized box targets); its levels' size ranges
    (from anchor sizes 8-128: 0-64, 64-128, ..., 512+) are mmdet's regress_ranges. Inference
    as mmdet's test_cfg (set here; torchvision's: score 0.2, NMS 0.6): score > 0.05, NMS 0.5, 100 per image.
  Mask R-CNN: the same RPN (one conv3x3, 3 anchors per position, 0.7/0.3 IoU, 256 samples, half positive)
    and RoI heads (2 fc 1024; 4 conv3x3 + deconv mask head; 512 RoIs, a quarter positive, 0.5 IoU; box coder
    weights 10, 10, 5, 5 = mmdet's stds 0.1, 0.1, 0.2, 0.2), but box losses are smooth L1 with beta 1/9
    (mmdet: L1) for the RPN and the RoI head; RoIAlign samples 2x2 points per bin on the unaligned grid
    (mmdet: adaptive sampling, aligned=True); the RPN keeps 1000 proposals per image after NMS in training
    (set here as mmdet's; torchvision's default is 2000); low-quality RPN matches need no minimum IoU (mmdet:
    0.3). Masks come back as probabilities (N, 1, H, W) pasted into the image, not binarized at 0.5.
  Both: no norms in the heads or the FPN (as the configs); torchvision's weight initialization (FPN convs
    kaiming-uniform with a=1, mmdet: xavier-uniform); images resized by torchvision's transform (bilinear on
    the tensor, shorter side to min_size, longer side at most max_size, padded to multiples of 32).

Shape legend: B images per batch, K object classes, N detections (or ground-truth objects) of one image,
H/W an image's height/width (each image its own), C_i channels of the backbone's stride-s_i map,
s_i = 4, 8, 16, 32; FPN levels have 256 channels at strides 8-128 (RetinaNet) or 4-64 (Mask R-CNN).
Images are float (3, H, W) in [0, 1]; boxes are (N, 4) absolute x1, y1, x2, y2 pixels.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.models.detection import FCOS, MaskRCNN, RetinaNet
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from .backbone import DenseBackbone
from .features import head_and_features, release_drop_path
from .names import is_biformer, is_head_model, parse_head_name, split_head_name

DETECTION_HEADS = ("retinanet", "fcos", "maskrcnn")
MASK_HEADS = ("maskrcnn",)  # the heads that also predict instance masks
FPN_CHANNELS = 256
N_WIN = 16  # BRA regions per side in the original COCO configs (1333x800 inputs)
DETECTIONS_PER_IMAGE = 100  # mmdet's max_per_img for every head
RPN_POST_NMS_TRAIN = 1000  # mmdet's rpn_proposal max_per_img in training (and torchvision's in testing)
MASKRCNN_ROIS_PER_IMAGE = 512  # RoIs sampled per image for the RoI heads' losses (mmdet's and torchvision's)
# the first backbone map (index into strides 4, 8, 16, 32) that each head's FPN reads
FIRST_LEVEL = {"retinanet": 1, "fcos": 1, "maskrcnn": 0}

# Drop path rates of the release's COCO configs; it has none for BiFormer-T (0.1 here is ours).
RELEASE_DROP_PATH = {"biformer_small": 0.2, "biformer_base": 0.3}


@dataclass(frozen=True)
class DetectionSettings:
    """What the original COCO configs (the BiFormer release's mmdet 1x configs) fix about a head and backbone's
    model and inputs; their optimization settings are the `coco-1x` recipe of `biformer.recipes`.

    1333x800 keep-ratio resize with horizontal flip 0.5, the backbone's drop path and BRA regions per side.
    """

    max_size: int  # the longer image side at most (mmdet's img_scale 1333x800)
    min_size: int  # the shorter image side
    flip: float  # horizontal flip probability
    drop_path: float  # the backbone's stochastic depth rate (0 for non-BiFormer backbones)
    n_win: int  # BRA regions per side (BiFormer backbones)


def split_detection_name(name: str) -> tuple[str, str] | None:
    """'maskrcnn_biformer_tiny' -> ('maskrcnn', 'biformer_tiny'); None if `name` has no head prefix.

    Whether timm knows the backbone is not checked (see `is_detection_model`).
    """
    return split_head_name(name, DETECTION_HEADS)


def is_detection_model(name: str) -> bool:
    """A head prefix and a backbone that timm knows (BiFormer variants included)."""
    return is_head_model(name, DETECTION_HEADS)


def _parse(name: str) -> tuple[str, str]:
    return parse_head_name(name, DETECTION_HEADS, "detection")


def detection_settings(name: str) -> DetectionSettings:
    """The release's model and input settings for model `name`; UserError for an unknown name."""
    head, backbone = _parse(name)
    return DetectionSettings(max_size=1333, min_size=800, flip=0.5,
                           drop_path=release_drop_path(backbone, RELEASE_DROP_PATH.get(backbone)), n_win=N_WIN)


class InputP6P7(ExtraFPNBlock):
    """mmdet's RetinaNet extra levels (add_extra_convs='on_input'): P6 = conv3x3/s2(C5), P7 = conv3x3/s2(P6).

    (B, C_5, H / 32, W / 32) -> P6 (B, 256, H / 64, W / 64), P7 (B, 256, H / 128, W / 128), named "p6", "p7".
    Unlike torchvision's `LastLevelP6P7`, no ReLU before P7 (mmdet's relu_before_extra_convs=False) and
    always the input map, whatever its width.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        for conv in (self.p6, self.p7):  # as torchvision's FPN convs
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(x[-1])
        return [*results, p6, self.p7(p6)], [*names, "p6", "p7"]


class FeaturePyramid(nn.Module):
    """The detectors' `backbone`: (B, 3, H, W) -> OrderedDict of 5 maps (B, 256, H / s, W / s).

    body: the backbone (maps at strides 4-32, `.out_channels`); fpn: torchvision's FPN over the maps from
    `first_level` on, with `extra` levels on top. Keys: "0", "1", ... for the FPN's input levels (finest
    first, as torchvision's RoI poolers expect), then the extra levels' ("p6", "p7" or "pool").
    norm_eval: the body's BatchNorms stay in eval mode in training (see the module docstring).
    """

    def __init__(self, body: nn.Module, first_level: int, extra: ExtraFPNBlock, norm_eval: bool) -> None:
        super().__init__()
        self.body, self.first_level, self.norm_eval = body, first_level, norm_eval
        self.fpn = FeaturePyramidNetwork(list(body.out_channels[first_level:]), FPN_CHANNELS, extra_blocks=extra)
        self.out_channels = FPN_CHANNELS  # what torchvision's heads read
        self.strides = [*body.reductions[first_level:]]
        self.strides += [self.strides[-1] * 2 ** (i + 1) for i in range(5 - len(self.strides))]

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.body(images)[self.first_level:]
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))

    def train(self, mode: bool = True) -> FeaturePyramid:
        super().train(mode)
        if not self.norm_eval:
            return self
        for module in self.body.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


def _check_labels(targets: list[dict[str, Tensor]] | None, num_classes: int, name: str) -> None:
    labels = [target["labels"] for target in targets or () if target["labels"].numel()]
    if labels:
        low, high = (int(value) for value in torch.cat(labels).aminmax())
        if low < 1 or high > num_classes:
            raise ValueError(f"{name}: target labels must be 1..{num_classes} (0 is no class), got {low}..{high}")


class CheckedLabels:
    """Refuses training labels outside 1..K (`num_classes`) before torchvision's forward sees them."""

    name: str
    num_classes: int

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        if self.training:
            _check_labels(targets, self.num_classes, self.name)
        return super().forward(images, targets)


class SigmoidClasses(CheckedLabels):
    """K sigmoid class outputs for labels 1..K (RetinaNet's and FCOS's): class k is output k - 1 in the loss,
    and detections of output k - 1 are labelled k (see the module docstring)."""

    def compute_loss(self, targets: list[dict[str, Tensor]], *outputs_and_anchors: Any) -> dict[str, Tensor]:
        shifted = [{**target, "labels": target["labels"] - 1} for target in targets]  # class k -> output k - 1
        return super().compute_loss(shifted, *outputs_and_anchors)

    def postprocess_detections(self, *outputs_anchors_and_shapes: Any) -> list[dict[str, Tensor]]:
        detections = super().postprocess_detections(*outputs_anchors_and_shapes)
        return [{**detection, "labels": detection["labels"] + 1} for detection in detections]


class RetinaNetModel(SigmoidClasses, RetinaNet):
    """torchvision's RetinaNet with K sigmoid classes for labels 1..K (see the module docstring).

    Training: model(images: list[(3, H, W)], targets: list[{"boxes": (N, 4), "labels": (N,) int64}])
    -> {"classification", "bbox_regression"} losses; eval: model(images) -> [{"boxes": (N, 4),
    "scores": (N,), "labels": (N,)}] in each input image's pixels.
    """

    def __init__(self, name: str, num_classes: int, backbone: FeaturePyramid, settings: DetectionSettings,
                 **kwargs: Any) -> None:
        super().__init__(backbone, num_classes, detections_per_img=DETECTIONS_PER_IMAGE, **kwargs)
        self.name, self.num_classes, self.settings = name, num_classes, settings


class FCOSModel(SigmoidClasses, FCOS):
    """torchvision's FCOS with K sigmoid classes for labels 1..K and mmdet's inference settings.

    Training: model(images, targets) as RetinaNet -> {"classification", "bbox_regression", "bbox_ctrness"}
    losses; eval: model(images) -> [{"boxes": (N, 4), "scores": (N,), "labels": (N,)}].
    """

    def __init__(self, name: str, num_classes: int, backbone: FeaturePyramid, settings: DetectionSettings,
                 **kwargs: Any) -> None:
        kwargs = {"score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": DETECTIONS_PER_IMAGE, **kwargs}
        super().__init__(backbone, num_classes, **kwargs)
        self.name, self.num_classes, self.settings = name, num_classes, settings


class MaskRCNNModel(CheckedLabels, MaskRCNN):
    """torchvision's Mask R-CNN with K + 1 classes, 0 the background, for labels 1..K.

    Training: model(images: list[(3, H, W)], targets: list[{"boxes": (N, 4), "labels": (N,) int64,
    "masks": (N, H, W) uint8}]) -> {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
    "loss_rpn_box_reg"}; eval: model(images) -> [{"boxes": (N, 4), "labels": (N,), "scores": (N,),
    "masks": (N, 1, H, W) probabilities}] in each input image's pixels.
    """

    def __init__(self, name: str, num_classes: int, backbone: FeaturePyramid, settings: DetectionSettings,
                 **kwargs: Any) -> None:
        kwargs = {"box_detections_per_img": DETECTIONS_PER_IMAGE, "rpn_post_nms_top_n_train": RPN_POST_NMS_TRAIN,
                  **kwargs}
        super().__init__(backbone, num_classes + 1, **kwargs)
        self.name, self.num_classes, self.settings = name, num_classes, settings


DetectionModel = RetinaNetModel | FCOSModel | MaskRCNNModel
MODEL_CLASSES = {"retinanet": RetinaNetModel, "fcos": FCOSModel, "maskrcnn": MaskRCNNModel}


def _normalization(body: nn.Module) -> tuple[list[float], list[float]]:
    """The mean and std the backbone was pretrained with: a timm model's pretrained_cfg, else ImageNet's."""
    config = getattr(getattr(body, "model", None), "pretrained_cfg", None) or {}
    return list(config.get("mean", IMAGENET_DEFAULT_MEAN)), list(config.get("std", IMAGENET_DEFAULT_STD))


def create_detection_model(
    name: str,
    num_classes: int,
    *,
    min_size: int = 800,
    max_size: int = 1333,
    n_win: int | tuple[int, ...] | None = N_WIN,
    padding: str = "masked",
    drop_path_rate: float | None = None,
    backbone_checkpoint: str | os.PathLike | None = None,
    region_size: int | tuple[int | None, ...] | None = None,
    head_options: dict[str, Any] | None = None,
    norm_eval: bool | None = None,
    **backbone_kwargs: Any,
) -> DetectionModel:
    """Detection model `name` (`<head>_<backbone>`, see the module docstring) for `num_classes` object classes.

    num_classes: K, not counting the background; targets' labels are 1..K.
    min_size, max_size: torchvision's resize (in training and inference): the shorter side to min_size unless
        the longer would pass max_size (the original: 800, 1333).
    n_win, region_size, padding, backbone_checkpoint: the BiFormer backbone's (see `create_backbone`); n_win 16
        as in the original COCO configs. backbone_checkpoint: a classification checkpoint (the release's or
        ours) or an original mmdet/mmseg one (its `backbone.` part); the backbone's `.checkpoint_report`
        says what was used. Other backbones take none of them (ValueError).
    drop_path_rate: the backbone's stochastic depth; None takes the settings' (`detection_settings`).
    head_options: more arguments of torchvision's `RetinaNet` or `MaskRCNN` (e.g. box_batch_size_per_image).
    norm_eval: keep the backbone's BatchNorm statistics frozen in training; None: only when it starts from
        backbone_checkpoint (see the module docstring).
    backbone_kwargs: more arguments of the backbone model.
    Returns a `RetinaNetModel`, `FCOSModel` or `MaskRCNNModel` (torchvision's forward contract) with `.name`,
    `.num_classes` and `.settings`. UserError for an unknown name or a backbone without maps at strides 4-32.
    """
    if num_classes < 1:  # before the backbone's construction: K counts object classes, not the background
        raise ValueError(f"num_classes must be at least 1 (object classes, the background not counted), got {num_classes}")
    settings = detection_settings(name)
    head, body = head_and_features(
        name, DETECTION_HEADS, "detection", num_classes, default_drop_path=settings.drop_path, default_n_win=N_WIN,
        drop_path_rate=drop_path_rate, n_win=n_win, region_size=region_size, padding=padding,
        backbone_checkpoint=backbone_checkpoint, **backbone_kwargs)
    first = FIRST_LEVEL[head]
    if head == "retinanet":
        extra: ExtraFPNBlock = InputP6P7(body.out_channels[-1], FPN_CHANNELS)
    elif head == "fcos":
        extra = LastLevelP6P7(FPN_CHANNELS, FPN_CHANNELS)
    else:
        extra = LastLevelMaxPool()
    if first > 0 and isinstance(body, DenseBackbone):  # the stride-4 map's norm feeds nothing: no gradient
        body.norms[0].requires_grad_(False)  # (DDP needs none)
    backbone = FeaturePyramid(body, first, extra, backbone_checkpoint is not None if norm_eval is None else norm_eval)
    mean, std = _normalization(body)
    model = MODEL_CLASSES[head](name, num_classes, backbone, settings, min_size=min_size, max_size=max_size,
                                image_mean=mean, image_std=std, **(head_options or {}))
    return model.train()  # frozen BatchNorms in eval mode from the start


def detection_model_for_size(name: str, num_classes: int, img_size: int, drop_path_rate: float | None = None,
                             backbone_checkpoint: str | os.PathLike | None = None) -> DetectionModel:
    """Detection model `name` for images whose shorter side is resized to `img_size` (`biformer train
    --img-size`): the release's 800x1333 scaled by img_size / 800. The longer side is at most img_size x 1333 /
    800, and a BiFormer backbone's regions keep the size they have at 800 (n_win 16 there; 3 at 128). Below
    800, Mask R-CNN's box counts shrink with the image side too (RPN proposals kept after NMS 1000 -> 160 at
    128, RoIs sampled per image 512 -> 82, detections per image 100 -> 16): a smaller image holds fewer boxes
    worth proposing, and at 128 px the full counts make the RoI and mask heads cost 10x the backbone."""
    settings = detection_settings(name)
    head, backbone = split_detection_name(name)
    scale = img_size / settings.min_size
    n_win = max(1, round(N_WIN * scale)) if is_biformer(backbone) else None
    head_options = {}
    if head == "maskrcnn" and scale < 1:
        proposals = round(RPN_POST_NMS_TRAIN * scale)
        head_options = {"rpn_post_nms_top_n_train": proposals, "rpn_post_nms_top_n_test": proposals,
                        "box_batch_size_per_image": round(MASKRCNN_ROIS_PER_IMAGE * scale),
                        "box_detections_per_img": round(DETECTIONS_PER_IMAGE * scale)}
    return create_detection_model(name, num_classes, min_size=img_size,
                                  max_size=round(img_size * settings.max_size / settings.min_size),
                                  n_win=n_win, drop_path_rate=drop_path_rate, head_options=head_options,
                                  backbone_checkpoint=backbone_checkpoint)
