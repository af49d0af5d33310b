"""`biformer eval`: a checkpoint's metrics on a data set's validation split (top-1/top-5, mIoU/aAcc, or COCO AP)."""
from __future__ import annotations

import argparse
import json
import math
import sys

from ..errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a checkpoint", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate a checkpoint (ours, or an original release file with --model) on the validation "
                    "split of --data: classifiers on digits or a folder with val/<class>/*; segmentation models "
                    "(sfpn_*, upernet_*) on digit-scenes, a folder with images/val, masks/val and classes.txt, or "
                    "ADE20K's ADEChallengeData2016 folder; detection models (retinanet_*, fcos_*, maskrcnn_*) on digit-scenes "
                    "or a folder in COCO's layout (annotations/instances_val*.json beside val*/), with COCO's AP.",
    )
    parser.add_argument("--checkpoint", required=True, help=".safetensors from `biformer train`, or a release .pth")
    parser.add_argument("--model", default=None, help="model name (read from our checkpoints when omitted)")
    parser.add_argument("--data", default=None, help="default: digits for classifiers, digit-scenes for dense models")
    parser.add_argument("--img-size", type=int, default=None, help="default: the checkpoint's / model's (segmentation "
                                                                   "and detection: the shorter side images are resized to)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--amp", nargs="?", const="auto", choices=("none", "auto", "bf16", "fp16"), default="none",
                        help="mixed precision; --amp alone: bf16 on CPU and recent GPUs, fp16 on older GPUs")
    parser.add_argument("--device", default=None)
    segmentation = parser.add_argument_group("segmentation")
    segmentation.add_argument("--mode", choices=("whole", "slide"), default="whole",
                              help="the whole (padded) image at once, or a sliding window")
    segmentation.add_argument("--window", type=int, default=None, help="sliding window size (default: --img-size)")
    segmentation.add_argument("--stride", type=int, default=None, help="sliding window stride (default: 2/3 window)")
    segmentation.add_argument("--flip", action="store_true", help="average with the mirrored image's prediction")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..dense.restore import dense_task
    from ..training.runtime import Dist, resolve_amp, resolve_device

    env = Dist(device=resolve_device(args.device))
    amp = resolve_amp(args.amp, env.device)
    task = dense_task(args.checkpoint, args.model)
    if task != "segmentation" and (args.mode != "whole" or args.flip or args.window or args.stride):
        raise UserError("--mode, --window, --stride and --flip are for segmentation models; leave them out")
    if task == "segmentation":
        result, text = _segmentation(args, env, amp)
    elif task == "detection":
        result, text = _detection(args, env, amp)
    else:
        result, text = _classification(args, env, amp)
    if args.json:  # an AP without ground truth in its size range is NaN, which JSON spells null
        result = {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in result.items()}
    print(json.dumps(result) if args.json else text)
    return 0


def _check_classes(found: list[str], saved: list[str], recorded: bool = True) -> None:
    if len(found) != len(saved):
        raise UserError(f"--data has {len(found)} classes but the checkpoint has {len(saved)}")
    if recorded and found != saved:
        raise UserError(f"--data classes {found[:5]}... differ from the checkpoint's {saved[:5]}...")


def _evaluate(task, splits, model, args: argparse.Namespace, env, amp: str) -> dict:
    from ..training.task import UnreadableImages, val_loader

    unreadable = UnreadableImages()
    loader = val_loader(splits.val, args.batch_size, args.workers, env, task.collate)
    result = task.evaluate(model.to(env.device), loader, env, amp, unreadable=unreadable)
    skipped = unreadable.count(env)
    if skipped:
        print(f"{skipped} unreadable image(s) were skipped", file=sys.stderr)
    return result


def _classification(args: argparse.Namespace, env, amp: str) -> tuple[dict, str]:
    from ..checkpoints.restore import restore_model
    from ..training.classification import ClassificationTask

    task = ClassificationTask()
    loaded = restore_model(args.checkpoint, args.model, args.img_size)
    splits = task.build_datasets(args.data or "digits", loaded.img_size, eval_only=True)
    _check_classes(splits.classes, loaded.classes, loaded.classes_recorded)
    result = _evaluate(task, splits, loaded.model, args, env, amp)
    return result, (f"{args.checkpoint}: val_loss {result['loss']:.4f}  val_top1 {result['top1']:.2f}%  "
                    f"val_top5 {result['top5']:.2f}%  ({result['count']} images)")


def _segmentation(args: argparse.Namespace, env, amp: str) -> tuple[dict, str]:
    from ..dense.metrics import iou_table
    from ..dense.restore import restore_dense_model
    from ..training.segmentation import SegmentationTask

    loaded = restore_dense_model(args.checkpoint, args.img_size)
    task = SegmentationTask(mode=args.mode, window=args.window or loaded.img_size, stride=args.stride, flip=args.flip)
    splits = task.build_datasets(args.data or "digit-scenes", loaded.img_size, eval_only=True)
    _check_classes(splits.classes, loaded.classes)
    result = _evaluate(task, splits, loaded.model, args, env, amp)
    return result, (f"{args.checkpoint}: mIoU {result['miou']:.2f}%  aAcc {result['aacc']:.2f}%  "
                    f"val_loss {result['loss']:.4f}  ({result['count']} images)\n"
                    + iou_table(loaded.classes, result["class_iou"]))


def _detection(args: argparse.Namespace, env, amp: str) -> tuple[dict, str]:
    from ..dense.coco_eval import METRIC_NAMES
    from ..dense.restore import restore_dense_model
    from ..training.detection import detection_task

    loaded = restore_dense_model(args.checkpoint, args.img_size)
    task = detection_task(loaded.model_name)
    splits = task.build_datasets(args.data or "digit-scenes", loaded.img_size, eval_only=True)
    _check_classes(splits.classes, loaded.classes)
    result = _evaluate(task, splits, loaded.model, args, env, amp)
    lines = [f"{args.checkpoint}: {result['count']} images, COCO AP (%) at shorter side {loaded.img_size}",
             f"{'':6}" + "".join(f"{name:>8}" for name in METRIC_NAMES)]
    lines += [f"{iou_type:<6}" + "".join(f"{result[f'{iou_type}_{name}']:8.2f}" for name in METRIC_NAMES)
              for iou_type in task.iou_types()]
    return result, "\n".join(lines)
