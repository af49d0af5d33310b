"""`biformer predict`: top-k classes for image files or folders, as a table or JSON."""
from __future__ import annotations

import argparse
import json
import sys

import torch
from PIL import Image

from ..errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="classify images", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Print the top-k classes of each image (files, or folders searched recursively).",
    )
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--checkpoint", required=True, help=".safetensors from `biformer train`, or a release .pth")
    parser.add_argument("--model", default=None, help="model name (read from our checkpoints when omitted)")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from timm.data import create_transform

    from ..checkpoints.restore import restore_model
    from ..training.data import UNREADABLE_ERRORS, list_images
    from ..training.runtime import resolve_device

    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}")
    files = list_images(args.inputs)
    loaded = restore_model(args.checkpoint, args.model, args.img_size)
    device = resolve_device(args.device)
    model = loaded.model.to(device)
    transform = create_transform(loaded.img_size, interpolation="bicubic", crop_pct=loaded.crop_pct,
                                 mean=loaded.mean, std=loaded.std)
    k = min(args.topk, len(loaded.classes))
    skipped = 0
    for path in files:
        try:
            with Image.open(path) as image:
                batch = transform(image.convert("RGB"))[None].to(device)
        except UNREADABLE_ERRORS as error:
            print(f"skipping unreadable image {path}: {error}", file=sys.stderr)
            skipped += 1
            continue
        with torch.no_grad():
            probabilities = model(batch).float().softmax(-1)[0]
        top = probabilities.topk(k)
        predictions = [{"class": loaded.classes[i], "index": int(i), "probability": float(p)}
                       for p, i in zip(top.values.tolist(), top.indices.tolist())]
        if args.json:
            print(json.dumps({"image": path, "predictions": predictions}))
        else:
            print(path)
            for rank, prediction in enumerate(predictions, 1):
                print(f"  {rank}. {prediction['class']:<30} {100 * prediction['probability']:6.2f}%")
    if skipped:
        print(f"{skipped} unreadable image(s) skipped", file=sys.stderr)
    return 0 if skipped < len(files) else 1
