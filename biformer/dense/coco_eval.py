"""COCO evaluation of detections: the models' outputs as COCO result entries, and pycocotools' COCOeval.

The AP figures are pycocotools' own (COCO/COCOeval, not reimplemented), in percent: `<type>_ap` (AP at IoU
0.50:0.95), `_ap50`, `_ap75`, `_aps`, `_apm`, `_apl` (small/medium/large objects) for iou type "bbox" and,
with masks, "segm". A size range without ground-truth objects has no AP: pycocotools says -1, here NaN.
Crowd ground truth is handled by COCOeval itself (detections matched to it are ignored). pycocotools'
prints go to this module's logger at DEBUG level.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from typing import Any, Sequence

import numpy as np
from torch import Tensor

from ..errors import UserError
from ..files import atomic_output, read_json

log = logging.getLogger(__name__)
METRIC_NAMES = ("ap", "ap50", "ap75", "aps", "apm", "apl")  # COCOeval.stats[0:6]
IOU_TYPES = ("bbox", "segm")
MASK_THRESHOLD = 0.5


def detections_to_coco_results(detections: Sequence[dict[str, Tensor]], image_ids: Sequence[int],
                               category_ids: Sequence[int], with_masks: bool) -> list[dict[str, Any]]:
    """COCO result entries of the models' detections (one dict per image: boxes (N, 4) x1, y1, x2, y2 in the
    image's pixels, scores (N,), labels (N,) 1..K and, for Mask R-CNN, masks (N, 1, H, W) probabilities).

    image_ids[i] is detections[i]'s COCO image id and category_ids[k - 1] label k's COCO category id. Boxes
    become [x, y, width, height]; masks (with_masks) are thresholded at 0.5 and run-length encoded, their
    counts as str so that the entries are JSON-ready.
    """
    from pycocotools import mask as mask_utils

    if len(detections) != len(image_ids):
        raise ValueError(f"{len(detections)} detections for {len(image_ids)} image ids")
    results = []
    for detection, image_id in zip(detections, image_ids):
        boxes = detection["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
        scores = detection["scores"].detach().float().cpu().numpy().tolist()
        labels = detection["labels"].detach().cpu().numpy().tolist()
        if any(not 1 <= label <= len(category_ids) for label in labels):
            raise ValueError(f"labels {sorted(set(labels))} outside 1..{len(category_ids)} (the category ids)")
        rles = []
        if with_masks and len(labels):
            masks = detection["masks"].detach().cpu()
            masks = (masks[:, 0] if masks.dim() == 4 else masks) > MASK_THRESHOLD  # (N, H, W)
            rles = mask_utils.encode(np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8)))
        for i, (box, score, label) in enumerate(zip(boxes.tolist(), scores, labels)):
            entry = {"image_id": int(image_id), "category_id": int(category_ids[label - 1]),
                     "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": float(score)}
            if with_masks:
                entry["segmentation"] = {"size": [int(v) for v in rles[i]["size"]],
                                         "counts": rles[i]["counts"].decode("ascii")}
            results.append(entry)
    return results


def write_coco_results(results: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """The result entries as a JSON file (COCO's results format, loadable by COCO.loadRes), written atomically."""
    with atomic_output(path) as temp:
        temp.write_text(json.dumps(results), encoding="utf-8")


@contextlib.contextmanager
def _quiet() -> Any:
    """pycocotools prints progress and tables: send them to the log instead of stdout."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        if buffer.getvalue().strip():
            log.debug("pycocotools:\n%s", buffer.getvalue().rstrip())


def _load_ground_truth(path: str | os.PathLike) -> Any:
    from pycocotools.coco import COCO

    path = os.fspath(path)
    data = read_json(path, "ground-truth file")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                    "categories")):
        raise UserError(f"ground-truth file {path!r} lacks COCO's 'images', 'annotations' and 'categories' lists")
    ground_truth = COCO()
    ground_truth.dataset = data
    with _quiet():
        ground_truth.createIndex()
    return ground_truth


def _load_results(ground_truth: Any, results: list[dict[str, Any]], iou_type: str) -> Any:
    """The results as a COCO object for one iou type; an empty one when there are none (loadRes fails on [])."""
    from pycocotools.coco import COCO

    # loadRes takes the area (which decides the small/medium/large range) from the box when there is one:
    # segm results go in without their boxes (as detectron2 does), bbox results without their masks
    drop = "bbox" if iou_type == "segm" else "segmentation"
    entries = [{k: v for k, v in copy.deepcopy(entry).items() if k != drop} for entry in results]
    if not entries:
        empty = COCO()
        empty.dataset = {"images": list(ground_truth.dataset["images"]), "annotations": [],
                         "categories": copy.deepcopy(ground_truth.dataset["categories"])}
        with _quiet():
            empty.createIndex()
        return empty
    if iou_type == "segm" and "segmentation" not in entries[0]:
        raise UserError("segm evaluation needs results with a 'segmentation' (mask) each")
    try:
        with _quiet():
            return ground_truth.loadRes(entries)
    except AssertionError as error:  # pycocotools asserts that the image ids are the ground truth's
        raise UserError("the results name image ids that the ground-truth file does not list") from error


def evaluate_coco(ground_truth_json: str | os.PathLike, results: list[dict[str, Any]] | str | os.PathLike,
                  iou_types: Sequence[str] = ("bbox",)) -> dict[str, float]:
    """pycocotools' COCO metrics, in percent, of `results` (result entries or a results JSON file) against
    the ground-truth instances file: {"bbox_ap": .., "bbox_ap50": .., ..., "segm_apl": ..} for `iou_types`.

    No results at all gives AP 0 (NaN for size ranges without ground truth), not an error.
    """
    from pycocotools.cocoeval import COCOeval

    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown:
        raise ValueError(f"iou types {unknown} are none of {IOU_TYPES}")
    if isinstance(results, (str, os.PathLike)):
        path = os.fspath(results)
        results = read_json(path, "results file")
        if not isinstance(results, list):
            raise UserError(f"results file {path!r} holds no list of COCO result entries")
    ground_truth = _load_ground_truth(ground_truth_json)
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        detections = _load_results(ground_truth, results, iou_type)
        evaluator = COCOeval(ground_truth, detections, iou_type)
        with _quiet():
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for name, value in zip(METRIC_NAMES, evaluator.stats[: len(METRIC_NAMES)]):
            metrics[f"{iou_type}_{name}"] = math.nan if value < 0 else float(value) * 100
    return metrics
