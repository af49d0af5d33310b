"""Volumetric segmentation models: `unet_<backbone>`, a U-shaped decoder of MONAI's UNETR blocks on a volume
BiFormer (a `biformer3d_*` built with `isotropic=True`: every axis halved from stride 4 to 32), as UNETR and
SwinUNETR put theirs on a ViT and a Swin; and MONAI's own networks by name, so that one command trains and compares
them: `swinunetr-<feature size>` (SwinUNETR; 24 and 48 are its papers' settings) and `monai_unet` (UNet with its
tutorials' 16..256 channels and residual units). Needs MONAI (`pip install 'biformer[medical]'`).

Shape legend: B volumes, C input channels (modalities), K classes, D/H/W depth, height and width in voxels.
(B, C, D, H, W) in, (B, K, D, H, W) logits out; ours take any D/H/W (the volume is zero-padded at the end of each
axis to a multiple of 32 and the logits cropped back, as the 2-D models do), MONAI's multiples of their
downsampling (`volume_side_multiple`).
"""
from __future__ import annotations

import os
from functools import partial
from typing import Sequence

import timm
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..layers.instance_norm import make_instance_norms_exportable
from .names import split_head_name

VOLUME_HEADS = ("unet",)
VOLUME_MODEL_FORMS = ("unet_biformer3d_<nano|tiny|small|base>, MONAI's swinunetr-<feature size, a multiple of 12> "
                      "or monai_unet")  # for messages
MONAI_UNET = "monai_unet"
SWINUNETR_PREFIX = "swinunetr-"
VOLUME_STRIDE = 32  # the encoder's deepest stride on every axis
FEATURE_SIZE = 24  # the decoder's full-resolution width (SwinUNETR's smaller setting), doubling per level


def is_volume_model(name: str) -> bool:
    """Whether `name` is a volume segmentation model: ours or MONAI's (`is_monai_volume_model`)."""
    return is_biformer_volume_model(name) or is_monai_volume_model(name)


def is_biformer_volume_model(name: str) -> bool:
    """Whether `name` is `<head>_biformer3d_<size>` with a head of VOLUME_HEADS."""
    parts = split_head_name(name, VOLUME_HEADS)
    return parts is not None and parts[1].startswith("biformer3d_") and timm.is_model(parts[1])


def is_monai_volume_model(name: str) -> bool:
    """Whether `name` is one of MONAI's networks: `swinunetr-<feature size>` (a multiple of 12) or `monai_unet`."""
    size = name.removeprefix(SWINUNETR_PREFIX)
    return name == MONAI_UNET or (name.startswith(SWINUNETR_PREFIX) and size.isdigit() and int(size) % 12 == 0
                                  and int(size) > 0)


def monai_blocks():
    """MONAI's network blocks; UserError naming the extra to install without it."""
    try:
        from monai.networks import blocks
    except ImportError as error:
        raise UserError("volumetric segmentation needs MONAI: pip install 'biformer[medical]' (monai, nibabel)") from error
    return blocks


class VolumeSegmenter(nn.Module):
    """The encoder's four maps (strides 4, 8, 16, 32 on every axis), each through a residual block to the
    decoder's width at its level (2F, 4F, 8F, 16F), and a full-resolution one from the input (F); up-blocks go from
    stride 32 to 4 (x2 each) and from 4 to 1 (x4), each joined with its skip; a 1x1x1 conv gives the logits."""

    def __init__(self, backbone: str, in_channels: int, num_classes: int, feature_size: int = FEATURE_SIZE,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        blocks = monai_blocks()
        self.encoder = timm.create_model(backbone, isotropic=True, in_chans=in_channels, num_classes=0,
                                         drop_path_rate=drop_path_rate)
        widths = [info["num_chs"] for info in self.encoder.feature_info]
        size = feature_size
        residual = partial(blocks.UnetrBasicBlock, spatial_dims=3, kernel_size=3, stride=1, norm_name="instance",
                           res_block=True)
        self.input_skip = residual(in_channels=in_channels, out_channels=size)
        self.skips = nn.ModuleList(residual(in_channels=width, out_channels=size * 2 ** (level + 1))
                                   for level, width in enumerate(widths))
        up = partial(blocks.UnetrUpBlock, spatial_dims=3, kernel_size=3, norm_name="instance", res_block=True)
        self.ups = nn.ModuleList([up(in_channels=size * 16, out_channels=size * 8, upsample_kernel_size=2),
                                  up(in_channels=size * 8, out_channels=size * 4, upsample_kernel_size=2),
                                  up(in_channels=size * 4, out_channels=size * 2, upsample_kernel_size=2),
                                  up(in_channels=size * 2, out_channels=size, upsample_kernel_size=4)])
        self.head = blocks.UnetOutBlock(spatial_dims=3, in_channels=size, out_channels=num_classes)
        make_instance_norms_exportable(self)  # the decoder's norms, exported as accurately as they run
        self.num_classes, self.in_channels = num_classes, in_channels

    def forward(self, volumes: Tensor) -> Tensor:  # (B, C, D, H, W) -> (B, K, D, H, W)
        depth, height, width = volumes.shape[2:]
        padding = [amount for size in (width, height, depth) for amount in (0, (-size) % VOLUME_STRIDE)]
        x = F.pad(volumes, padding)
        features = self.encoder.forward_intermediates(x, intermediates_only=True, output_fmt="NCTHW")
        skips = [skip(feature) for skip, feature in zip(self.skips, features)]
        y = skips[-1]
        for up, skip in zip(self.ups, [*reversed(skips[:-1]), self.input_skip(x)]):
            y = up(y, skip)
        return self.head(y)[:, :, :depth, :height, :width]


def create_volume_model(name: str, num_classes: int, in_channels: int = 1, *, drop_path_rate: float = 0.0,
                        backbone_checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """Model `name` (see `is_volume_model`); backbone_checkpoint: a classifier's weights for our encoder (an
    image model's are inflated, RGB input kernels adapted to `in_channels`); the load is reported in
    `checkpoint_report`. Every model has `in_channels` and `num_classes`."""
    if not is_volume_model(name):
        raise UserError(f"{name!r} is no volume model: write {VOLUME_MODEL_FORMS}")
    if is_monai_volume_model(name):
        return _create_monai_model(name, num_classes, in_channels, drop_path_rate, backbone_checkpoint)
    model = VolumeSegmenter(split_head_name(name, VOLUME_HEADS)[1], in_channels, num_classes,
                            drop_path_rate=drop_path_rate)
    if backbone_checkpoint is not None:
        from ..checkpoints.loading import load_pretrained_classifier

        model.checkpoint_report = load_pretrained_classifier(model.encoder, backbone_checkpoint)
    return model


def volume_side_multiple(name: str) -> int:
    """What every side of volume model `name`'s input must be a multiple of: 1 for ours (they pad), the product of
    the downsamplings for MONAI's (UNet: four strides of 2; SwinUNETR: a stride-2 patch embedding and four patch
    mergings)."""
    if not is_monai_volume_model(name):
        return 1
    return 16 if name == MONAI_UNET else 32


def check_volume_sides(name: str, sides: Sequence[int], option: str) -> None:
    """UserError naming `option` unless volume model `name` takes inputs (or sliding windows) of these sides."""
    multiple = volume_side_multiple(name)
    if any(side % multiple for side in sides):
        fitting = " ".join(str(max(multiple, side - side % multiple)) for side in sides)
        raise UserError(f"{option} {' '.join(map(str, sides))}: MONAI's {name} takes only sides that are multiples of "
                        f"{multiple} (ours pad any size); choose e.g. {fitting}")


def monai_not_supported_reasons(name: str, drop_path_rate: float, pretrained: bool) -> list[str]:
    """Why MONAI's network `name` cannot be built with these training options (empty: it can)."""
    reasons = []
    if pretrained:
        reasons.append(f"--pretrained starts the encoder of a unet_biformer3d_* model; MONAI's {name} has none of ours "
                       "(train it from scratch)")
    if name == MONAI_UNET and drop_path_rate:
        reasons.append(f"--drop-path {drop_path_rate}: MONAI's UNet has no stochastic depth (leave it at 0)")
    return reasons


def _create_monai_model(name: str, num_classes: int, in_channels: int, drop_path_rate: float,
                        backbone_checkpoint: str | os.PathLike | None) -> nn.Module:
    monai_blocks()  # the extra's message when MONAI is missing
    from monai.networks import nets

    reasons = monai_not_supported_reasons(name, drop_path_rate, backbone_checkpoint is not None)
    if reasons:
        raise UserError("; ".join(reasons))
    if name == MONAI_UNET:
        model = nets.UNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes,
                          channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    else:
        model = nets.SwinUNETR(in_channels=in_channels, out_channels=num_classes, dropout_path_rate=drop_path_rate,
                               feature_size=int(name.removeprefix(SWINUNETR_PREFIX)))
    model.in_channels, model.num_classes = in_channels, num_classes
    return model
