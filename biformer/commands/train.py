"""`biformer train`: train a BiFormer (or any timm model), or a segmentation or detection model on it.

The options are generated from `TrainConfig`'s fields: their defaults, help and checks live there.
"""
from __future__ import annotations

import argparse

from ..config import TrainConfig
from ._options import HelpFormatter, add_fields, typed_fields


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model", formatter_class=HelpFormatter,
        description="Train on the embedded digits data set (--data digits) or an image folder with "
                    "train/<class>/* and val/<class>/*; segmentation and detection models (HEAD_BACKBONE, e.g. "
                    "upernet_biformer_tiny or maskrcnn_biformer_small) on --data digit-scenes or their own layouts. The "
                    "model's name decides its task. Under torchrun it trains with DistributedDataParallel.",
    )
    add_fields(parser, TrainConfig)
    parser.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig.from_options(typed_fields(args, TrainConfig))


def run(args: argparse.Namespace) -> int:
    from ..training.engine import train

    train(config_from_args(args))
    return 0
