"""`biformer train`: train a BiFormer (or any timm model), or a segmentation or detection model on it.

The options are generated from `TrainConfig`'s fields: their defaults, help and checks live there.
"""
from __future__ import annotations

import argparse
import typing
from dataclasses import fields

from ..config import TrainConfig, flag


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train on the embedded digits data set (--data digits) or an image folder with "
                    "train/<class>/* and val/<class>/*; segmentation and detection models (HEAD_BACKBONE, e.g. "
                    "upernet_biformer_tiny or maskrcnn_biformer_small) on --data digit-scenes or their own layouts. The "
                    "model's name decides its task. Under torchrun it trains with DistributedDataParallel.",
    )
    hints = typing.get_type_hints(TrainConfig)
    for spec in fields(TrainConfig):
        if not spec.init:
            continue
        parser.add_argument(flag(spec.name), default=spec.default, help=spec.metadata["help"],
                            **_parsing(hints[spec.name], spec.default), **spec.metadata["cli"])
    parser.set_defaults(run=run)


def _parsing(hint: typing.Any, default: typing.Any) -> dict[str, typing.Any]:
    """How argparse reads a field of this type: a switch for a bool, else a value of the type (None aside)."""
    if hint is bool:  # a recipe may switch it on (an Unset default): then --no-NAME switches it off
        return {"action": argparse.BooleanOptionalAction if default else "store_true"}
    return {"type": next(kind for kind in typing.get_args(hint) or (hint,) if kind is not type(None))}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{spec.name: getattr(args, spec.name) for spec in fields(TrainConfig) if spec.init})


def run(args: argparse.Namespace) -> int:
    from ..training.engine import train

    train(config_from_args(args))
    return 0
