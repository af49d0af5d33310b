"""`biformer predict`: what a checkpoint's model sees in images, as its task shows it: top-k classes (a table or
JSON) for a classifier; a colour overlay PNG and the raw label PNG per image for a segmentation model; a PNG with
the detections drawn per image and all detections as one COCO results JSON for a detection model."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import UserError
from ._options import HelpFormatter, add_task_option_groups, positive, task_options


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="predict images with a checkpoint's model", formatter_class=HelpFormatter,
        description="Print the top-k classes of each image (files, or folders searched recursively); with a "
                    "segmentation checkpoint, write <name>_overlay.png (the image tinted by class, with a legend) "
                    "and <name>_labels.png (one class index per pixel) per image into --output; with a detection "
                    "checkpoint, <name>_detections.png (boxes, classes, scores and masks drawn) per image and "
                    "detections.json (COCO's results format, every detection) into --output.",
    )
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--checkpoint", required=True, help=".safetensors from `biformer train`, or a release .pth")
    parser.add_argument("--model", default=None, help="model name (read from our checkpoints when omitted)")
    parser.add_argument("--img-size", type=positive, default=None,
                        help="input size (default: the checkpoint's; segmentation and detection: the shorter side)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the GPU if there is one)")
    parser.add_argument("--json", action="store_true", help="print a JSON line per image instead of text")
    parser.add_argument("--output", default=None,
                        help="segmentation and detection: the folder for the PNG (and JSON) files (created if missing)")
    parser.set_defaults(run=run)


def add_task_options(parser: argparse.ArgumentParser) -> None:
    """The options of each task's `PredictOptions`, a group per task."""
    add_task_option_groups(parser, "predict")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..tasks.inference import iter_predictions, prediction_outputs
    from ..tasks.registry import task_for_checkpoint

    task, metadata, model_name = task_for_checkpoint(args.checkpoint, args.model)
    files = task.list_inputs(args.inputs)
    options = task_options(args, task, "predict")
    outputs = prediction_outputs(task, files, options, args.output)  # checked before the model loads
    restored = task.restore(args.checkpoint, metadata, model_name, args.img_size)
    predictions = []
    for prediction in iter_predictions(restored, files, options, outputs, args.device):
        predictions.append(prediction)
        if prediction.problem is not None:
            kind = "" if prediction.readable else f"unreadable {task.input_noun} "
            print(f"skipping {kind}{prediction.image}: {prediction.problem}", file=sys.stderr)
        elif args.json:
            print(json.dumps({"image": prediction.image, **prediction.result, "files": list(prediction.files)}))
        else:
            print(task.prediction_text(prediction))
    problems = [prediction for prediction in predictions if prediction.problem is not None]
    if len(problems) == len(files):
        first = problems[0]
        raise UserError(f"none of the {len(files)} {task.input_noun}(s) could be predicted ({first.image}: {first.problem}"
                        + (f"; {len(files) - 1} more named above)" if len(files) > 1 else ")"))
    if task.predicts_files:
        for path in task.write_predictions(predictions, Path(args.output).expanduser()):
            print(f"wrote {path}")
    if problems:
        unreadable = sum(not prediction.readable for prediction in problems)
        counts = ((unreadable, "unreadable"), (len(problems) - unreadable, "unpredictable"))
        print(" and ".join(f"{count} {kind}" for count, kind in counts if count) + f" {task.input_noun}(s) skipped", file=sys.stderr)
    return 0
