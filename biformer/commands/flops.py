"""`biformer flops`: parameters and FLOPs per stage (or part) and per op kind, paper convention and complete, of
any model the package builds: a classifier, a segmentation or a detection model, by name or from a checkpoint."""
from __future__ import annotations

import argparse

from ..errors import UserError
from ._options import HelpFormatter, positive


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "flops", help="parameters and FLOPs of a model, per stage and per op kind",
        formatter_class=HelpFormatter,
        description="Count with torch's FlopCounterMode (plus formulas for CPU attention) on one forward pass in "
                    "eval mode. The paper convention counts one per multiply-add of convolutions, linear layers, "
                    "routing and attention; the complete count adds every other arithmetic op. A detection model "
                    "resizes its input (the shorter side to --img-size) and counts what its random weights propose.",
    )
    parser.add_argument("model", nargs="?", default=None,
                        help="a model name of any task (biformer_small, upernet_biformer_small, "
                             "maskrcnn_biformer_small, any timm classifier); read from --checkpoint when omitted")
    parser.add_argument("--checkpoint", default=None, help="count the model of this weights file (ours, or a release "
                                                           ".pth with the model's name)")
    parser.add_argument("--img-size", type=positive, nargs="+", metavar="N", default=None,
                        help="input H W (or one value for a square); default: the checkpoint's, else the model's "
                             "reference size (ImageNet's for classifiers, the ADE20K crop, COCO's shorter side)")
    parser.add_argument("--frames", type=positive, default=None,
                        help="frames per clip, for a clip model (biformer3d_*; default: its reference clip's)")
    parser.add_argument("--batch", type=positive, default=1, help="images per counted forward pass")
    parser.add_argument("--num-classes", type=positive, default=None,
                        help="output classes of a model by name (default: its reference data set's)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis.flops import count_flops, format_report
    from ..tasks.registry import task_for_checkpoint, task_for_model

    if args.img_size is not None and len(args.img_size) > 2:
        raise UserError(f"--img-size takes one or two sizes (H W), got {len(args.img_size)}")
    if args.model is None and args.checkpoint is None:
        raise UserError("name a model (e.g. biformer_small) or pass --checkpoint FILE")
    side = min(args.img_size) if args.img_size else None
    if args.checkpoint is not None:
        if args.num_classes is not None:
            raise UserError("--num-classes is for a model by name; a checkpoint's model has its own classes")
        task, metadata, name = task_for_checkpoint(args.checkpoint, args.model)
        restored = task.restore(args.checkpoint, metadata, name, side)
        model, default_side = restored.model, restored.img_size
    else:
        task, name = task_for_model(args.model, "model"), args.model
        default_side = task.reference_size(name)
        model = task.untrained_model(name, side or default_side, args.num_classes)
    size = tuple((args.img_size * 2)[:2]) if args.img_size else (default_side, default_side)
    if task.input_noun != "clip" and args.frames is not None:
        raise UserError(f"--frames is for clip models (biformer3d_*, swin3d_t, ...); {name} takes {task.input_noun}s")
    in_chans, size = task.input_size(model, name, size, args.frames)
    try:
        report = count_flops(model, size, args.batch, in_chans=in_chans, progress=True)
    except (ValueError, RuntimeError) as error:  # an input the model cannot take
        raise UserError(f"{name} cannot run a {'x'.join(map(str, size))} input: {str(error).splitlines()[0]}") from error
    print(format_report(report, name))
    return 0
