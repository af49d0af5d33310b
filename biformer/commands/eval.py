"""`biformer eval`: a checkpoint's metrics on a data set's validation split (top-1/top-5, mIoU/aAcc, or COCO AP)."""
from __future__ import annotations

import argparse
import json
import math
import sys

from ..errors import UserError
from ._options import check_task_options, non_negative, positive, record_defaults


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a checkpoint", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    parser.add_argument("--batch-size", type=positive, default=64)
    parser.add_argument("--workers", type=non_negative, default=0)
    parser.add_argument("--amp", nargs="?", const="auto", choices=("none", "auto", "bf16", "fp16"), default="none",
                        help="mixed precision; --amp alone: bf16 on CPU and recent GPUs, fp16 on older GPUs")
    parser.add_argument("--device", default=None)
    segmentation = parser.add_argument_group("segmentation")
    segmentation.add_argument("--mode", choices=("whole", "slide"), default="whole",
                              help="the whole (padded) image at once, or a sliding window")
    segmentation.add_argument("--window", type=positive, default=None, help="sliding window size (default: --img-size)")
    segmentation.add_argument("--stride", type=positive, default=None, help="sliding window stride (default: 2/3 window)")
    segmentation.add_argument("--flip", action="store_true", help="average with the mirrored image's prediction")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)
    record_defaults(parser, ("mode", "window", "stride", "flip"))


def run(args: argparse.Namespace) -> int:
    from ..runtime import Dist, resolve_amp, resolve_device
    from ..tasks.base import UnreadableImages, val_loader
    from ..tasks.registry import task_for_checkpoint

    env = Dist(device=resolve_device(args.device))
    amp = resolve_amp(args.amp, env.device)
    task, metadata, model_name = task_for_checkpoint(args.checkpoint, args.model)
    check_task_options(args, task, task.eval_options, "eval")
    restored = task.restore(args.checkpoint, metadata, model_name, args.img_size)
    task.configure(args, restored)
    splits = task.build_datasets(args.data or task.default_data, restored.img_size, eval_only=True)
    _check_classes(splits.classes, restored.classes, restored.classes_recorded)
    unreadable = UnreadableImages()
    loader = val_loader(splits.val, args.batch_size, args.workers, env, task.collate)
    result = task.evaluate(restored.model.to(env.device), loader, env, amp, unreadable=unreadable)
    skipped = unreadable.count(env)
    if skipped:
        print(f"{skipped} unreadable image(s) were skipped", file=sys.stderr)
    if args.json:  # an AP without ground truth in its size range is NaN, which JSON spells null
        result = {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in result.items()}
    print(json.dumps(result) if args.json else task.report(result, restored, args.checkpoint))
    return 0


def _check_classes(found: list[str], saved: list[str], recorded: bool = True) -> None:
    if len(found) != len(saved):
        raise UserError(f"--data has {len(found)} classes but the checkpoint has {len(saved)}")
    if recorded and found != saved:
        raise UserError(f"--data classes {found[:5]}... differ from the checkpoint's {saved[:5]}...")
