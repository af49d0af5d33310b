"""`biformer train`: train a BiFormer (or any timm model) on the embedded digits or an image folder."""
from __future__ import annotations

import argparse

from ..errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train on the embedded digits data set (--data digits) or an image folder with "
                    "train/<class>/* and val/<class>/*. Under torchrun it trains with DistributedDataParallel.",
    )
    parser.add_argument("--data", default="digits", help="'digits' or a folder with train/ and val/")
    parser.add_argument("--model", default="biformer_nano", help="a biformer_* or any timm model name")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (the cosine schedule's length)")
    parser.add_argument("--img-size", type=int, default=32, help="input size in pixels (digits are upscaled to it)")
    parser.add_argument("--output", default="runs/train", help="folder for checkpoints and metrics.jsonl")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--opt", default="adamw", help="timm optimizer name")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, reached after the warm-up")
    parser.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine decay")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="decoupled weight decay (AdamW)")
    parser.add_argument("--warmup-epochs", type=int, default=2, help="linear warm-up from lr/100")
    parser.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    parser.add_argument("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment)")
    parser.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    parser.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    parser.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    parser.add_argument("--clip-grad", type=float, default=None, help="gradient norm clipping")
    parser.add_argument("--model-ema", action="store_true", help="also keep and evaluate an EMA of the weights")
    parser.add_argument("--ema-decay", type=float, default=0.998, help="EMA decay per step")
    parser.add_argument("--amp", nargs="?", const="auto", choices=("none", "auto", "bf16", "fp16"), default="none",
                        help="mixed precision; --amp alone: bf16 on CPU and recent GPUs, fp16 on older GPUs")
    parser.add_argument("--sync-bn", action="store_true",
                        help="SyncBatchNorm across GPUs (on CPU, BatchNorm statistics are averaged after each epoch)")
    parser.add_argument("--workers", type=int, default=0, help="data loading processes")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (None: the GPU if there is one)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model, data order and augmentation")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output from its last complete epoch (same settings required)")
    parser.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                        help="also log to TensorBoard when it is installed")
    parser.add_argument("--record-shards", default=None, help=argparse.SUPPRESS)  # debug: per-rank sample log
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..training.engine import train

    for name, least in (("epochs", 1), ("img_size", 1), ("batch_size", 1), ("workers", 0), ("warmup_epochs", 0),
                        ("lr", 0), ("weight_decay", 0), ("mixup", 0), ("cutmix", 0), ("smoothing", 0)):
        if getattr(args, name) < least:
            raise UserError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if args.img_size < 32:
        raise UserError(f"--img-size must be at least 32 (BiFormer downsamples 32x), got {args.img_size}")
    train(args)
    return 0
