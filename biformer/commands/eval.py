"""`biformer eval`: a checkpoint's metrics on a data set's validation split (top-1/top-5, mIoU/aAcc, or COCO AP)."""
from __future__ import annotations

import argparse
import json
import math
import sys

from ._options import HelpFormatter, add_task_option_groups, non_negative, positive, task_options


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a checkpoint", formatter_class=HelpFormatter,
        description="Evaluate a checkpoint (ours, or an original release file with --model) on the validation "
                    "split of --data: classifiers on digits or a folder with val/<class>/*; segmentation models "
                    "on digit-scenes, a folder with images/val, masks/val and classes.txt, or ADE20K's "
                    "ADEChallengeData2016 folder; detection models on digit-scenes or a folder in COCO's layout "
                    "(annotations/instances_val*.json beside val*/), with COCO's AP.",
    )
    parser.add_argument("--checkpoint", required=True, help=".safetensors from `biformer train`, or a release .pth")
    parser.add_argument("--model", default=None, help="model name (read from our checkpoints when omitted)")
    parser.add_argument("--data", default=None, help="default: digits for classifiers, digit-scenes for dense models")
    parser.add_argument("--img-size", type=positive, default=None, help="default: the checkpoint's / model's (segmentation "
                                                                   "and detection: the shorter side images are resized to)")
    parser.add_argument("--batch-size", type=positive, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=non_negative, default=0, help="data loading processes")
    parser.add_argument("--amp", nargs="?", const="auto", choices=("none", "auto", "bf16", "fp16"), default="none",
                        help="mixed precision; --amp alone: bf16 on CPU and recent GPUs, fp16 on older GPUs")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the GPU if there is one)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def add_task_options(parser: argparse.ArgumentParser) -> None:
    """The options of each task's `EvalOptions`, a group per task."""
    add_task_option_groups(parser, "eval")


def run(args: argparse.Namespace) -> int:
    from ..tasks.inference import evaluate
    from ..tasks.registry import task_for_checkpoint

    task, metadata, model_name = task_for_checkpoint(args.checkpoint, args.model)
    options = task_options(args, task, "eval")
    restored = task.restore(args.checkpoint, metadata, model_name, args.img_size)
    result = evaluate(restored, args.data, options, batch_size=args.batch_size, workers=args.workers, amp=args.amp,
                      device=args.device)
    if result["unreadable"]:
        print(f"{result['unreadable']} unreadable image(s) were skipped", file=sys.stderr)
    if args.json:  # an AP without ground truth in its size range is NaN, which JSON spells null
        result = {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in result.items()}
    print(json.dumps(result) if args.json else task.report(result, restored, args.checkpoint))
    return 0
