"""`biformer flops`: parameters and FLOPs per stage and per op kind, paper convention and complete."""
from __future__ import annotations

import argparse

from ..analysis.flops import count_flops, format_report
from ..errors import UserError
from ._options import HelpFormatter


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "flops", help="parameters and FLOPs of a model, per stage and per op kind",
        formatter_class=HelpFormatter,
        description="Count with torch's FlopCounterMode (plus formulas for CPU attention) on one forward pass. "
                    "The paper convention counts one per multiply-add of convolutions, linear layers, routing "
                    "and attention; the complete count adds every other arithmetic op.",
    )
    parser.add_argument("model", help="a biformer_* (or any timm) model name")
    parser.add_argument("--img-size", type=int, nargs="+", metavar="N", default=None,
                        help="input H W (or one value for a square); default: the model's input size")
    parser.add_argument("--batch", type=int, default=1, help="images per counted forward pass")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier classes (default: the model's)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import timm

    if args.img_size is not None and (len(args.img_size) not in (1, 2) or min(args.img_size) < 1):
        raise UserError(f"--img-size takes one or two positive sizes (H W), got {args.img_size}")
    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    if not timm.is_model(args.model):
        raise UserError(f"unknown model {args.model!r}; BiFormer models: {', '.join(timm.list_models('biformer*'))}")
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = timm.create_model(args.model, **kwargs)
    default_size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    size = tuple(args.img_size * 2 if args.img_size and len(args.img_size) == 1 else args.img_size or default_size[1:])
    try:
        report = count_flops(model, size, args.batch, in_chans=default_size[0], progress=True)
    except (ValueError, RuntimeError) as error:  # an input the model cannot take
        raise UserError(f"{args.model} cannot run a {size[0]}x{size[1]} input: {str(error).splitlines()[0]}") from error
    print(format_report(report, args.model))
    return 0
