"""`biformer predict`: top-k classes of images (a table or JSON), or for a segmentation model a colour
overlay PNG and the raw label PNG per image."""
from __future__ import annotations

import argparse
import json
import sys

from pathlib import Path

import torch
from PIL import Image

from ..errors import UserError
from ..files import check_writable


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="classify images", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Print the top-k classes of each image (files, or folders searched recursively); with a "
                    "segmentation checkpoint, write <name>_overlay.png (the image tinted by class, with a legend) "
                    "and <name>_labels.png (one class index per pixel) per image into --output.",
    )
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--checkpoint", required=True, help=".safetensors from `biformer train`, or a release .pth")
    parser.add_argument("--model", default=None, help="model name (read from our checkpoints when omitted)")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    segmentation = parser.add_argument_group("segmentation")
    segmentation.add_argument("--output", default=None, help="folder for the PNG files (created if missing)")
    segmentation.add_argument("--mode", choices=("whole", "slide"), default="whole")
    segmentation.add_argument("--flip", action="store_true", help="average with the mirrored image's prediction")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from timm.data import create_transform

    from ..checkpoints.restore import restore_model
    from ..training.data import UNREADABLE_ERRORS, list_images
    from ..training.runtime import resolve_device

    from ..dense.restore import is_segmentation_checkpoint

    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}")
    files = list_images(args.inputs)
    if is_segmentation_checkpoint(args.checkpoint, args.model):
        return _segment_files(files, args)
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


def _segment_files(files: list[str], args: argparse.Namespace) -> int:
    """Write each image's overlay and label PNGs; 1 if no image could be read."""
    from ..dense.drawing import overlay
    from ..dense.inference import resize_scores, segment
    from ..dense.restore import restore_segmentation_model
    from ..files import atomic_output
    from ..training.data import UNREADABLE_ERRORS
    from ..training.runtime import resolve_device
    from ..training.segmentation_data import ValTransform

    if args.output is None:
        raise UserError("--output FOLDER is required for a segmentation checkpoint (the PNG files go there)")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    check_writable(output / "probe.png", "--output")
    loaded = restore_segmentation_model(args.checkpoint, args.img_size)
    device = resolve_device(args.device)
    model, transform = loaded.model.to(device), ValTransform(loaded.img_size, loaded.mean, loaded.std)
    skipped = 0
    for path in files:
        try:
            with Image.open(path) as file:
                image = file.convert("RGB")
        except UNREADABLE_ERRORS as error:
            print(f"skipping unreadable image {path}: {error}", file=sys.stderr)
            skipped += 1
            continue
        with torch.no_grad():
            logits = segment(model, transform.image(image)[None].to(device), mode=args.mode,
                             window=loaded.img_size, flip=args.flip)
        labels = resize_scores(logits, (image.height, image.width)).argmax(1)[0].to(torch.uint8).cpu().numpy()
        stem = output / Path(path).stem
        for suffix, picture in (("_overlay.png", overlay(image, labels, loaded.classes)),
                                ("_labels.png", Image.fromarray(labels, mode="L"))):
            with atomic_output(f"{stem}{suffix}") as temp:
                picture.save(temp, format="PNG")
        print(f"{path} -> {stem}_overlay.png, {stem}_labels.png")
    if skipped:
        print(f"{skipped} unreadable image(s) skipped", file=sys.stderr)
    return 0 if skipped < len(files) else 1
