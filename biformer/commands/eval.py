"""`biformer eval`: loss, top-1 and top-5 of a checkpoint on a data set's validation split."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a checkpoint", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate a checkpoint (ours, or an original release file with --model) on the validation "
                    "split of --data (digits, or a folder with val/<class>/*).",
    )
    parser.add_argument("--checkpoint", required=True, help=".safetensors from `biformer train`, or a release .pth")
    parser.add_argument("--model", default=None, help="model name (read from our checkpoints when omitted)")
    parser.add_argument("--data", default="digits", help="'digits' or a folder with val/")
    parser.add_argument("--img-size", type=int, default=None, help="default: the checkpoint's / model's")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--amp", nargs="?", const="auto", choices=("none", "auto", "bf16", "fp16"), default="none",
                        help="mixed precision; --amp alone: bf16 on CPU and recent GPUs, fp16 on older GPUs")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints.restore import restore_model
    from ..training.data import build_datasets
    from ..training.engine import UnreadableImages, evaluate, val_loader
    from ..training.runtime import Dist, resolve_amp, resolve_device

    env = Dist(device=resolve_device(args.device))
    amp = resolve_amp(args.amp, env.device)
    loaded = restore_model(args.checkpoint, args.model, args.img_size)
    splits = build_datasets(args.data, loaded.img_size, eval_only=True)
    if len(splits.classes) != len(loaded.classes):
        raise UserError(f"--data has {len(splits.classes)} classes but the checkpoint has {len(loaded.classes)}")
    if loaded.classes_recorded and splits.classes != loaded.classes:
        raise UserError(f"--data classes {splits.classes[:5]}... differ from the checkpoint's {loaded.classes[:5]}...")
    model = loaded.model.to(env.device)
    unreadable = UnreadableImages()
    result = evaluate(model, val_loader(splits.val, args.batch_size, args.workers, env), env, amp,
                      unreadable=unreadable)
    skipped = unreadable.count(env)
    if skipped:
        print(f"{skipped} unreadable image(s) were skipped", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.checkpoint}: val_loss {result['loss']:.4f}  val_top1 {result['top1']:.2f}%  "
              f"val_top5 {result['top5']:.2f}%  ({result['count']} images)")
    return 0
