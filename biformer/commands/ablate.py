"""`biformer ablate`: BRA against window, stripe, grid and full attention in one layout, on your data."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ._options import HelpFormatter


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _numbers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(value) for value in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# the defaults of AblationOptions, spelled out here so that building the parser does not import torch or timm
# (tests/test_ablation.py checks that they agree)
DEFAULTS = {"data": "digits", "model": "biformer_stl", "attention": "bra,window,stripe,grid,full", "topk": "1,4,16",
            "seeds": 3, "epochs": 30, "img_size": 224, "batch_size": 64, "lr": 2e-3, "warmup_epochs": 2,
            "output": Path("runs/ablate"), "device": None, "workers": 0, "repeats": 5}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ablate", help="compare BRA with other sparse attentions (the paper's ablation) on your data",
        formatter_class=HelpFormatter,
        description="Train one BiFormer layout with each token mixer (and BRA with each top-k), every one with the "
                    "same recipe and seeds, then print params, FLOPs, images/s and val top-1 (mean ± std over "
                    "seeds), and write ablation.csv and ablation.png into --output. Finished runs are skipped "
                    "on a rerun and stopped ones resume. Under torchrun the runs are spread over the ranks.",
    )
    parser.add_argument("--data", help="'digits' or a folder with train/ and val/")
    parser.add_argument("--model", help="the layout: a biformer_* variant (biformer_stl_nano: the STL layout for "
                                        "64 px images)")
    parser.add_argument("--attention", type=_names, help="comma-separated token mixers among bra, window (Swin), "
                                                         "stripe (CSWin), grid (MaxViT) and full")
    parser.add_argument("--topk", type=_numbers, help="BRA's first-stage top-k values, one configuration each "
                                                      "(later stages keep the layout's ratios, STL 1:4:16)")
    parser.add_argument("--seeds", type=int, help="runs per configuration (seeds 0..N-1)")
    parser.add_argument("--epochs", type=int, help="training epochs per run")
    parser.add_argument("--img-size", type=int, help="input size in pixels")
    parser.add_argument("--batch-size", type=int, help="also the timing batch")
    parser.add_argument("--lr", type=float, help="peak learning rate (AdamW, cosine)")
    parser.add_argument("--warmup-epochs", type=int, help="linear warm-up epochs")
    parser.add_argument("--output", type=Path, help="folder for the runs, table and plot")
    parser.add_argument("--device", help="cpu, cuda, ... (default: the GPU if any)")
    parser.add_argument("--workers", type=int, help="data loading processes")
    parser.add_argument("--repeats", type=int, help="interleaved timing rounds")
    parser.set_defaults(run=run, **DEFAULTS)


def run(args: argparse.Namespace) -> int:
    from ..benchmarks.ablation import AblationOptions, format_rows, run_ablation

    if isinstance(args.attention, str):  # the default is given as text
        args.attention = _names(args.attention)
    if isinstance(args.topk, str):
        args.topk = _numbers(args.topk)
    for option, value in (("--seeds", args.seeds), ("--repeats", args.repeats)):
        if value < 1:
            raise UserError(f"{option} must be at least 1, got {value}")
    options = AblationOptions(
        data=args.data, model=args.model, attentions=args.attention, topks=args.topk, seeds=args.seeds,
        epochs=args.epochs, img_size=args.img_size, batch_size=args.batch_size, lr=args.lr,
        warmup_epochs=args.warmup_epochs, output=args.output, device=args.device, workers=args.workers,
        repeats=args.repeats,
    )
    rows = run_ablation(options)
    if rows is not None:
        print(format_rows(rows))
        print(f"wrote {args.output / 'ablation.csv'} and {args.output / 'ablation.png'}")
    return 0
