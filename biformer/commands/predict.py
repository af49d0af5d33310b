"""`biformer predict`: what a checkpoint's model sees in images, as its task shows it: top-k classes (a table or
JSON) for a classifier; a colour overlay PNG and the raw label PNG per image for a segmentation model; a PNG with
the detections drawn per image and all detections as one COCO results JSON for a detection model."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import UserError
from ._options import check_task_options, positive, record_defaults


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="predict images with a checkpoint's model", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Print the top-k classes of each image (files, or folders searched recursively); with a "
                    "segmentation checkpoint, write <name>_overlay.png (the image tinted by class, with a legend) "
                    "and <name>_labels.png (one class index per pixel) per image into --output; with a detection "
                    "checkpoint, <name>_detections.png (boxes, classes, scores and masks drawn) per image and "
                    "detections.json (COCO's results format, every detection) into --output.",
    )
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--checkpoint", required=True, help=".safetensors from `biformer train`, or a release .pth")
    parser.add_argument("--model", default=None, help="model name (read from our checkpoints when omitted)")
    parser.add_argument("--topk", type=positive, default=5, help="classification: classes to show per image")
    parser.add_argument("--img-size", type=positive, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    dense = parser.add_argument_group("segmentation and detection")
    dense.add_argument("--output", default=None, help="folder for the PNG (and JSON) files (created if missing)")
    segmentation = parser.add_argument_group("segmentation")
    segmentation.add_argument("--mode", choices=("whole", "slide"), default="whole")
    segmentation.add_argument("--flip", action="store_true", help="average with the mirrored image's prediction")
    detection = parser.add_argument_group("detection")
    detection.add_argument("--score-threshold", type=float, default=0.3,
                           help="draw the detections scoring at least this (detections.json keeps them all); below "
                                "the model's own cut-off (0.05) it lowers that too")
    detection.add_argument("--annotations", default=None, metavar="JSON",
                           help="a COCO instances file that lists the images: their ids go into detections.json "
                                "(default: 1, 2, ... in the order the images are printed)")
    parser.set_defaults(run=run)
    record_defaults(parser, ("topk", "json", "mode", "flip", "output", "score_threshold", "annotations"))


def run(args: argparse.Namespace) -> int:
    from ..data.images import list_images
    from ..files import output_folder
    from ..runtime import resolve_device
    from ..tasks.registry import task_for_checkpoint

    files = list_images(args.inputs)
    task, metadata, model_name = task_for_checkpoint(args.checkpoint, args.model)
    check_task_options(args, task, task.predict_options, "predict")
    task.check_predict(args, files)
    outputs = None
    if task.predicts_files:
        if args.output is None:
            raise UserError(f"--output FOLDER is required for a {task.name} checkpoint (the PNG files go there)")
        outputs = output_stems(files, output_folder(args.output, "--output"))
    restored = task.restore(args.checkpoint, metadata, model_name, args.img_size)
    task.configure(args, restored)
    for stem in (outputs or {}).values():  # only now that the model loaded: no empty folders otherwise
        stem.parent.mkdir(parents=True, exist_ok=True)
    images, unreadable = _read_images(files)
    unpredictable = task.predict(images, restored, args, resolve_device(args.device), outputs)
    skipped = unreadable + unpredictable
    if skipped:
        counts = ((len(unreadable), "unreadable"), (len(unpredictable), "unpredictable"))
        print(" and ".join(f"{count} {kind}" for count, kind in counts if count) + " image(s) skipped", file=sys.stderr)
    return 0 if len(skipped) < len(files) else 1


def output_stems(files: list[str], folder: Path) -> dict[str, Path]:
    """Each input's output path without suffix: its path relative to the folder all inputs share, under
    `folder`, so that a/x.png and b/x.png do not write over each other."""
    absolute = [os.path.abspath(path) for path in files]
    common = os.path.commonpath([os.path.dirname(path) for path in absolute])
    return {path: folder / Path(os.path.relpath(full, common)).with_suffix("") for path, full in zip(files, absolute)}


def _read_images(files: list[str]):
    """(path, RGB image) of each readable file; unreadable ones are reported and counted in the returned list."""
    from ..data.images import UNREADABLE_ERRORS, open_rgb

    skipped: list[str] = []

    def readable():
        for path in files:
            try:
                image = open_rgb(path)
            except UNREADABLE_ERRORS as error:
                print(f"skipping unreadable image {path}: {error}", file=sys.stderr)
                skipped.append(path)
                continue
            yield path, image

    return readable(), skipped
