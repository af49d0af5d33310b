"""`biformer predict`: top-k classes of images (a table or JSON); for a segmentation model a colour overlay
PNG and the raw label PNG per image; for a detection model a PNG with the detections drawn per image and all
detections as one COCO results JSON."""
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
                    "and <name>_labels.png (one class index per pixel) per image into --output; with a detection "
                    "checkpoint, <name>_detections.png (boxes, classes, scores and masks drawn) per image and "
                    "detections.json (COCO's results format, every detection) into --output.",
    )
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--checkpoint", required=True, help=".safetensors from `biformer train`, or a release .pth")
    parser.add_argument("--model", default=None, help="model name (read from our checkpoints when omitted)")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--img-size", type=int, default=None)
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


def run(args: argparse.Namespace) -> int:
    from timm.data import create_transform

    from ..checkpoints.restore import restore_model
    from ..dense.restore import dense_task
    from ..training.data import list_images
    from ..training.runtime import resolve_device

    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}")
    files = list_images(args.inputs)
    task = dense_task(args.checkpoint, args.model)
    if task is not None:
        return _predict_dense(files, args, task)
    loaded = restore_model(args.checkpoint, args.model, args.img_size)
    device = resolve_device(args.device)
    model = loaded.model.to(device)
    transform = create_transform(loaded.img_size, interpolation="bicubic", crop_pct=loaded.crop_pct,
                                 mean=loaded.mean, std=loaded.std)
    k = min(args.topk, len(loaded.classes))
    images, skipped = _read_images(files)
    for path, image in images:
        batch = transform(image)[None].to(device)
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
        print(f"{len(skipped)} unreadable image(s) skipped", file=sys.stderr)
    return 0 if len(skipped) < len(files) else 1


def _output_folder(args: argparse.Namespace, task: str) -> Path:
    if args.output is None:
        raise UserError(f"--output FOLDER is required for a {task} checkpoint (the PNG files go there)")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    check_writable(output / "probe.png", "--output")
    return output


def _read_images(files: list[str]):
    """(path, RGB image) of each readable file; unreadable ones are reported and counted in the returned list."""
    from ..training.data import UNREADABLE_ERRORS

    skipped: list[str] = []

    def readable():
        for path in files:
            try:
                with Image.open(path) as file:
                    image = file.convert("RGB")
            except UNREADABLE_ERRORS as error:
                print(f"skipping unreadable image {path}: {error}", file=sys.stderr)
                skipped.append(path)
                continue
            yield path, image

    return readable(), skipped


def _save_png(picture: Image.Image, path: str) -> None:
    from ..files import atomic_output

    with atomic_output(path) as temp:
        picture.save(temp, format="PNG")


def _predict_dense(files: list[str], args: argparse.Namespace, task: str) -> int:
    """Write each image's pictures (and, for detection, detections.json); 1 if no image could be read."""
    from ..dense.restore import restore_dense_model
    from ..training.runtime import resolve_device

    if task == "detection" and (args.mode != "whole" or args.flip):
        raise UserError("--mode and --flip are for segmentation models; leave them out")
    if task == "segmentation" and args.annotations:
        raise UserError("--annotations is for detection models; leave it out")
    if not 0 <= args.score_threshold <= 1:
        raise UserError(f"--score-threshold must be within 0..1, got {args.score_threshold}")
    image_ids = _coco_image_ids(args.annotations, files) if args.annotations else None
    output = _output_folder(args, task)
    loaded = restore_dense_model(args.checkpoint, args.img_size)
    if loaded.task != task:
        raise UserError(f"--model names a {task} model but --checkpoint {args.checkpoint!r} holds a {loaded.task} model")
    device = resolve_device(args.device)
    loaded.model.to(device)
    images, skipped = _read_images(files)
    if task == "segmentation":
        _segment_images(images, loaded, output, device, args)
    else:
        _detect_images(images, loaded, output, device, args.score_threshold, image_ids)
    if skipped:
        print(f"{len(skipped)} unreadable image(s) skipped", file=sys.stderr)
    return 0 if len(skipped) < len(files) else 1


def _segment_images(images, loaded, output: Path, device, args: argparse.Namespace) -> None:
    from ..dense.drawing import overlay
    from ..dense.inference import resize_scores, segment
    from ..training.segmentation_data import ValTransform

    transform = ValTransform(loaded.img_size, loaded.mean, loaded.std)
    for path, image in images:
        with torch.no_grad():
            logits = segment(loaded.model, transform.image(image)[None].to(device), mode=args.mode,
                             window=loaded.img_size, flip=args.flip)
        labels = resize_scores(logits, (image.height, image.width)).argmax(1)[0].to(torch.uint8).cpu().numpy()
        stem = output / Path(path).stem
        _save_png(overlay(image, labels, loaded.classes), f"{stem}_overlay.png")
        _save_png(Image.fromarray(labels, mode="L"), f"{stem}_labels.png")
        print(f"{path} -> {stem}_overlay.png, {stem}_labels.png")


def _coco_image_ids(annotations: str, files: list[str]) -> dict[str, int]:
    """File name -> image id of each of `files` in a COCO instances file; UserError for a file it does not list."""
    from ..files import read_json

    data = read_json(annotations, "--annotations file")
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "file_name" in e and "id" in e for e in entries):
        raise UserError(f"--annotations {annotations!r} has no 'images' list with 'id' and 'file_name' entries "
                        "(COCO's instances format)")
    ids = {Path(entry["file_name"]).name: entry["id"] for entry in entries}
    unlisted = [Path(path).name for path in files if Path(path).name not in ids]
    if unlisted:
        raise UserError(f"--annotations {annotations!r} lists no image named {unlisted[0]!r}"
                        + (f" (nor {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""))
    return ids


def _detect_images(images, loaded, output: Path, device, score_threshold: float,
                   image_ids: dict[str, int] | None) -> None:
    """Draw each image's detections and write them all to detections.json; image_ids: file name -> COCO image
    id (None: 1, 2, ... in order)."""
    import torchvision.transforms.functional as F

    from ..dense.coco_eval import detections_to_coco_results, write_coco_results
    from ..dense.drawing import draw_detections

    scoring = getattr(loaded.model, "roi_heads", loaded.model)  # where Mask R-CNN / RetinaNet / FCOS keep their cut-off
    scoring.score_thresh = min(scoring.score_thresh, score_threshold)
    category_ids = loaded.category_ids or list(range(1, len(loaded.classes) + 1))
    results: list[dict] = []
    for number, (path, image) in enumerate(images, 1):
        image_id = number if image_ids is None else image_ids[Path(path).name]
        with torch.no_grad():
            detection = {key: value.cpu() for key, value in loaded.model([F.to_tensor(image).to(device)])[0].items()}
        results += detections_to_coco_results([detection], [image_id], category_ids, "masks" in detection)
        picture = output / f"{Path(path).stem}_detections.png"
        _save_png(draw_detections(image, detection, loaded.classes, score_threshold), str(picture))
        shown = int((detection["scores"] >= score_threshold).sum())
        print(f"{path} (image id {image_id}): {len(detection['scores'])} detections, {shown} drawn -> {picture}")
    write_coco_results(results, output / "detections.json")
    print(f"{len(results)} detections -> {output / 'detections.json'}")
