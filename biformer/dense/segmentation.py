"""Semantic segmentation on BiFormer or any timm backbone: Semantic FPN and UperNet, the paper's ADE20K heads.

A model is named `<head>_<backbone>`: `sfpn_biformer_small`, `upernet_biformer_base`, `sfpn_resnet18`,
`upernet_convnext_tiny`, ... A `biformer*` backbone is `create_backbone`'s (its stage maps pass through
the original's extra norms); any other timm model gives its `features_only` maps at strides 4, 8, 16, 32.
The decoders are segmentation_models_pytorch's (smp); the classifier (dropout 0.1, 1x1 conv) and the
UperNet auxiliary head are mmseg's, as in the original configs.

Against the original mmseg configs of the BiFormer release:

Semantic FPN (mmseg FPN neck, 256 channels, + FPNHead, 128 channels, SyncBN, dropout 0.1):
  - widths as in the paper: 256 pyramid channels, 128 segmentation channels;
  - smp has no 3x3 output conv on the pyramid levels (mmseg's `fpn_convs`): each level goes from the
    lateral sum straight to its scale head;
  - the scale heads normalize with GroupNorm (32 groups), not (Sync)BN, and upsample with
    `align_corners=True` (mmseg: False); their outputs are added, as in mmseg.
UperNet (mmseg UPerHead, 512 channels, PPM scales (1, 2, 3, 6), BN, dropout 0.1; auxiliary FCNHead on
the stride-16 map, 256 channels, one conv, dropout 0.1, loss weight 0.4):
  - the same structure and widths (512 channels, PPM scales (1, 2, 3, 6), BN, bilinear resizing with
    `align_corners=False`), but 128 channels on biformer_tiny and _nano, which the release has no configs
    for (see UPERNET_CHANNELS); the auxiliary head is mmseg's FCNHead, built from smp's Conv2dReLU;
  - smp layer-norms each backbone map before the head; a BiFormer backbone's maps already leave through
    the original's extra norms, so there those norms are identities (the original has none in the head);
    other timm backbones keep smp's;
  - smp's fusion concatenates four 512-channel maps at stride 4 (1 GiB at 1024x2048); `LeanUPerNetDecoder`
    computes the same conv as a sum over the levels instead (same weights, same result up to rounding).
Both: the logits are resized to the input with bilinear `align_corners=False`, as mmseg's inference does.

Shape legend: B batch, K classes, H/W input height/width (multiples of 32), C_i channels of the
backbone's stride-s_i map, s_i = 4, 8, 16, 32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base.modules import Conv2dReLU
from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import Tensor, nn

from .backbone import REDUCTIONS
from .features import head_and_features, release_drop_path
from .names import is_biformer, is_head_model, parse_head_name, split_head_name

SEGMENTATION_HEADS = ("sfpn", "upernet")
STRIDE = REDUCTIONS[-1]  # inputs are multiples of the coarsest map's stride
AUX_INDEX = 2  # the auxiliary head reads the stride-16 map (mmseg's in_index=2)
DROPOUT = 0.1  # before each classifier (mmseg's dropout_ratio)
AUX_CHANNELS = 256
# UperNet's width: the original configs' 512 for every backbone they train (BiFormer-S/B, Swin, ...). The
# original has no configs for the smaller variants; 512 channels at stride 4 would cost them 20x their
# backbone's FLOPs (58 GFLOPs per 128x128 training image), so they get a head of their own size.
UPERNET_CHANNELS = {"biformer_nano": 128, "biformer_tiny": 128}
CHANNELS_LAST = torch.channels_last

# Drop path rates of the release's ADE20K configs; it has none for BiFormer-T (0.1 here is ours).
RELEASE_DROP_PATH = {
    ("sfpn", "biformer_small"): 0.15, ("sfpn", "biformer_base"): 0.3,
    ("upernet", "biformer_small"): 0.3, ("upernet", "biformer_base"): 0.4,
}


@dataclass(frozen=True)
class SegmentationSettings:
    """What the original ADE20K configs (the BiFormer release's mmseg configs) fix about a head and backbone's
    model and inputs; their optimization settings are the `ade20k-sfpn` and `ade20k-upernet` recipes of
    `biformer.recipes`."""

    crop: int  # square training crop side
    drop_path: float  # the backbone's stochastic depth rate (0 for non-BiFormer backbones)
    aux_weight: float  # loss weight of the auxiliary head's output (0: no auxiliary head)


def split_segmentation_name(name: str) -> tuple[str, str] | None:
    """'upernet_biformer_tiny' -> ('upernet', 'biformer_tiny'); None if `name` has no head prefix.

    Whether timm knows the backbone is not checked (see `is_segmentation_model`).
    """
    return split_head_name(name, SEGMENTATION_HEADS)


def is_segmentation_model(name: str) -> bool:
    """A head prefix and a backbone that timm knows (BiFormer variants included)."""
    return is_head_model(name, SEGMENTATION_HEADS)


def _parse(name: str) -> tuple[str, str]:
    return parse_head_name(name, SEGMENTATION_HEADS, "segmentation")


def segmentation_settings(name: str) -> SegmentationSettings:
    """The release's model and input settings for model `name`; UserError for an unknown name."""
    head, backbone = _parse(name)
    drop_path = release_drop_path(backbone, RELEASE_DROP_PATH.get((head, backbone)))
    return SegmentationSettings(crop=512, drop_path=drop_path, aux_weight=0.4 if head == "upernet" else 0.0)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, align_corners=False; a map of that size already is returned as is (the resize is exact there)."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class LeanUPerNetDecoder(UPerNetDecoder):
    """smp's UPerNetDecoder, fed the backbone's four maps, with a forward that needs far less memory.

    [(B, C_i, H / s_i, W / s_i)] for s_i = 4, 8, 16, 32 -> (B, D, H / 4, W / 4), D = decoder_channels.
    smp resizes the PSP output and the three FPN levels to stride 4, keeps them in a list, concatenates
    them (4D channels at stride 4) and applies the 3x3 fusion conv. A conv of concatenated inputs is the
    sum of convs of each input with its slice of the weight, so here the levels stay at their own strides
    until each in turn is resized, convolved and added to one stride-4 sum, then freed. The maps are
    channels-last, which oneDNN's CPU convs take as they are (NCHW ones are copied to a blocked layout
    and back: 1.5 maps more per conv). Same parameters, same result up to float rounding. At 1024x2048
    (D = 512: 268 MB per stride-4 map) upernet_biformer_small's inference peaks at 2.0 GB RSS instead
    of 5.1 GB with smp's forward (`biformer bench segmentation`).
    normalize: keep smp's per-map LayerNorms (off for backbones whose maps are normed already).
    """

    def __init__(self, channels: list[int], decoder_channels: int, normalize: bool) -> None:
        # smp's decoder takes an encoder's channel list, which starts with the input and stride-2 maps
        super().__init__((0, 0, *channels), decoder_channels=decoder_channels, use_norm="batchnorm")
        self.out_channels = decoder_channels
        if not normalize:
            self.feature_norms = nn.ModuleList(nn.Identity() for _ in channels)

    def forward(self, features: list[Tensor]) -> Tensor:
        # channels-last saves memory at inference; in training oneDNN's NCHW backward ran 1.8x faster (D = 256)
        layout = torch.contiguous_format if torch.is_grad_enabled() else CHANNELS_LAST
        features = [norm(feature).contiguous(memory_format=layout)
                    for norm, feature in zip(self.feature_norms, features)]
        size = features[0].shape[-2:]
        state = self.psp(features[-1]).contiguous(memory_format=layout)  # its 1x1 pooling loses the format
        levels = [state]  # PSP output, then the FPN levels at strides 16, 8, 4 (top-down)
        for lateral, level_conv, feature in zip(self.fpn_lateral_blocks, self.fpn_conv_blocks, features[-2::-1]):
            state = lateral(state, feature)
            levels.append(level_conv(state))
        del state, features
        conv, norm, activation = self.fusion_block
        # smp concatenates the levels finest first (strides 4, 8, 16, PSP): weight slices in that order
        weights = conv.weight.chunk(len(levels), dim=1)
        fused = F.conv2d(levels.pop(), weights[0], padding=conv.padding)
        for weight in weights[1:]:  # unnamed temporaries: each is freed as soon as it is added
            fused += F.conv2d(_resize(levels.pop(), size), weight, padding=conv.padding)
        return activation(norm(fused))


def _classifier(channels: int, num_classes: int) -> nn.Sequential:
    """mmseg's `cls_seg`: dropout, then a 1x1 conv to class logits."""
    return nn.Sequential(nn.Dropout2d(DROPOUT), nn.Conv2d(channels, num_classes, kernel_size=1))


class SegmentationModel(nn.Module):
    """(B, 3, H, W) -> {"out": (B, K, H, W)} logits, plus "aux" (B, K, H, W) in training if the head has one.

    backbone: maps at strides 4-32 (`.out_channels`); decoder: smp's FPN or (lean) UperNet decoder, to
    stride 4; head: the classifier; aux_head: the FCN head on the stride-16 map (UperNet), else None.
    """

    def __init__(self, name: str, num_classes: int, backbone: nn.Module, settings: SegmentationSettings) -> None:
        super().__init__()
        kind, backbone_name = _parse(name)
        self.name, self.num_classes, self.settings = name, num_classes, settings
        self.backbone = backbone
        channels = list(backbone.out_channels)
        if kind == "sfpn":  # dropout is the classifier's (as mmseg's), not smp's decoder's
            self.decoder = FPNDecoder(channels, encoder_depth=5, pyramid_channels=256, segmentation_channels=128,
                                      dropout=0.0, merge_policy="add")
            self.aux_head = None
        else:
            self.decoder = LeanUPerNetDecoder(channels, decoder_channels=UPERNET_CHANNELS.get(backbone_name, 512),
                                              normalize=not is_biformer(backbone_name))
            self.aux_head = nn.Sequential(
                Conv2dReLU(channels[AUX_INDEX], AUX_CHANNELS, kernel_size=3, padding=1, use_norm="batchnorm"),
                _classifier(AUX_CHANNELS, num_classes),
            )
        self.head = _classifier(self.decoder.out_channels, num_classes)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        height, width = images.shape[-2:]
        # symbolic sizes (torch.export) go unchecked: a check would fix them; AnySizeSegmenter pads them to fit
        if isinstance(height, int) and isinstance(width, int) and (height % STRIDE or width % STRIDE):
            fit = lambda n: -(-n // STRIDE) * STRIDE  # noqa: E731
            raise ValueError(
                f"images of {height}x{width}: {self.name} needs height and width divisible by {STRIDE}; "
                f"pad or resize them (e.g. pad to {fit(height)}x{fit(width)})")
        features = self.backbone(images)
        aux = features[AUX_INDEX] if self.training and self.aux_head is not None else None
        logits = self.head(self.decoder(features)).contiguous()  # UperNet's decoder works channels-last
        del features  # the decoder's inputs go before the full-size logits are made
        outputs = {"out": _resize(logits, (height, width))}
        if aux is not None:
            outputs["aux"] = _resize(self.aux_head(aux), (height, width))
        return outputs


def create_segmentation_model(
    name: str,
    num_classes: int,
    *,
    n_win: int | tuple[int, ...] | None = 8,
    region_size: int | tuple[int | None, ...] | None = None,
    padding: str = "masked",
    drop_path_rate: float | None = None,
    backbone_checkpoint: str | os.PathLike | None = None,
    **backbone_kwargs: Any,
) -> SegmentationModel:
    """Segmentation model `name` (`<head>_<backbone>`, see the module docstring) with `num_classes` classes.

    n_win, region_size, padding, backbone_checkpoint: the BiFormer backbone's (see `create_backbone`);
        n_win 8 as in the original ADE20K configs (512x512 crops). Other backbones take none of them.
    drop_path_rate: the backbone's stochastic depth; None takes the settings' (`segmentation_settings`).
    backbone_kwargs: more arguments of the backbone model.
    UserError for an unknown name or a backbone without maps at strides 4-32.
    """
    settings = segmentation_settings(name)
    _, backbone = head_and_features(
        name, SEGMENTATION_HEADS, "segmentation", num_classes, default_drop_path=settings.drop_path, default_n_win=8,
        drop_path_rate=drop_path_rate, n_win=n_win, region_size=region_size, padding=padding,
        backbone_checkpoint=backbone_checkpoint, **backbone_kwargs)
    return SegmentationModel(name, num_classes, backbone, settings)
