"""COCO-format detection data (biformer.data.coco) and COCO evaluation (biformer.dense.coco_eval)."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import biformer.data.coco as dd
import biformer.data.scenes as sd
from biformer.data.coco import collate_detection, find_coco_split, read_coco
from biformer.data.scenes import digit_scenes_coco
from biformer.dense.coco_eval import detections_to_coco_results, evaluate_coco, write_coco_results
from biformer.errors import UserError

SIZES = {10: (40, 30), 20: (32, 24), 30: (20, 20)}  # image id -> (width, height)


def rle_of(box, width, height, compressed=True):
    """The RLE of a filled x1, y1, x2, y2 rectangle (compressed: counts a str; else uncompressed counts list)."""
    mask = np.zeros((height, width), np.uint8)
    mask[box[1]: box[3], box[0]: box[2]] = 1
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    flat = mask.ravel(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": [height, width], "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def polygon(x1, y1, x2, y2):
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def annotations(clean=False):
    """The tiny data set's annotation file content; clean: without the degenerate and the outside box."""
    anns = [
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [2, 2, 10, 8], "area": 80,
         "segmentation": polygon(2, 2, 12, 10), "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 7, "bbox": [20, 15, 10, 10], "area": 100,
         "segmentation": rle_of((20, 15, 30, 25), 40, 30), "iscrowd": 0},
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 20, 12, 10], "area": 120,
         "segmentation": rle_of((0, 20, 12, 30), 40, 30, compressed=False), "iscrowd": 1},
        {"id": 4, "image_id": 10, "category_id": 5, "bbox": [30, 20, 20, 20], "area": 400,  # partly outside
         "segmentation": polygon(30, 20, 50, 40), "iscrowd": 0},
        {"id": 5, "image_id": 20, "category_id": 3, "bbox": [5, 5, 0, 4], "area": 0,  # degenerate
         "segmentation": polygon(5, 5, 5, 9), "iscrowd": 0},
        {"id": 6, "image_id": 20, "category_id": 7, "bbox": [4, 4, 8, 8], "area": 64,
         "segmentation": polygon(4, 4, 12, 12), "iscrowd": 0},
    ]
    if clean:
        anns = [ann for ann in anns if ann["id"] not in (4, 5)]
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i, (w, h) in SIZES.items()],
        "annotations": anns,
        # listed unsorted: labels follow the sorted ids 3, 5, 7 -> 1, 2, 3
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 5, "name": "cow"}],
    }


@pytest.fixture
def coco(tmp_path):
    """A tiny COCO folder: annotations/instances_val2017.json beside val2017/ with three PNGs."""
    images = tmp_path / "val2017"
    images.mkdir()
    rng = np.random.default_rng(0)
    for image_id, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{image_id}.png")
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(annotations()))
    return path, images


def test_find_coco_split(coco, tmp_path):
    assert find_coco_split(tmp_path, "val") == coco
    assert find_coco_split(tmp_path, "val2017") == coco
    with pytest.raises(UserError, match="instances_train"):
        find_coco_split(tmp_path, "train")


def test_read_coco_targets(coco):
    data = read_coco(*coco)
    assert data.category_ids == [3, 5, 7] and data.classes == ["cat", "cow", "dog"]
    assert data.image_ids == [10, 20, 30] and len(data) == 3
    problems = data.problems
    assert (problems.clipped, problems.degenerate, problems.crowd, problems.negatives) == (1, 1, 1, 1)
    assert "1 boxes clipped" in problems.summary("x") and "1 degenerate" in problems.summary("x")

    image, target = data[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    expected = np.asarray(Image.open(coco[1] / "10.png").convert("RGB"), np.float32).transpose(2, 0, 1) / 255
    assert torch.allclose(image, torch.from_numpy(expected))
    assert target["boxes"].tolist() == [[2, 2, 12, 10], [20, 15, 30, 25], [30, 20, 40, 30]]  # crowd left out
    assert target["labels"].tolist() == [1, 3, 2]
    assert int(target["image_id"]) == 10
    masks = target["masks"]
    assert masks.shape == (3, 30, 40) and masks.dtype == torch.uint8
    areas = masks.sum((1, 2)).tolist()
    assert abs(areas[0] - 80) <= 20 and areas[1] == 100 and abs(areas[2] - 100) <= 20  # clipped polygon: 10x10
    for mask, box in zip(masks, target["boxes"].int().tolist()):
        inside = torch.zeros_like(mask)
        inside[box[1]: box[3] + 1, box[0]: box[2] + 1] = 1
        assert mask.sum() > 0 and (mask * (1 - inside)).sum() == 0

    _, target = data[1]
    assert target["boxes"].tolist() == [[4, 4, 12, 12]] and target["labels"].tolist() == [3]  # degenerate dropped
    _, target = data[2]  # the negative image
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["masks"].shape == (0, 20, 20)

    images, targets, problems = collate_detection([(*data[0], None), (*data[2], None)])
    assert [im.shape[1:] for im in images] == [(30, 40), (20, 20)] and len(targets) == 2 and problems == []
    boxes_only = read_coco(*coco, with_masks=False)[0][1]
    assert "masks" not in boxes_only and boxes_only["boxes"].shape == (3, 4)


def test_flip(coco, monkeypatch):
    plain = read_coco(*coco)[0]
    monkeypatch.setattr(dd.random, "random", lambda: 0.0)  # always flip
    image, target = read_coco(*coco, flip=True)[0]
    assert torch.equal(image, plain[0].flip(-1)) and torch.equal(target["masks"], plain[1]["masks"].flip(-1))
    assert target["boxes"].tolist()[0] == [40 - 12, 2, 40 - 2, 10]
    monkeypatch.setattr(dd.random, "random", lambda: 0.9)  # never
    assert torch.equal(read_coco(*coco, flip=True)[0][1]["boxes"], plain[1]["boxes"])


def break_file(path, change):
    data = annotations()
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case, pattern", [
    ("json", r"not valid JSON: .* line 2 column"),
    ("keys", r"lacks the top-level list\(s\) \['categories'\]"),
    ("category", r"annotation id 6 has category id 99"),
    ("image_ref", r"annotation id 2 refers to image id 77"),
    ("missing_image", r"image id 20's file .*20\.png' does not exist"),
    ("bbox", r"annotation id 1 needs a 'bbox'"),
])
def test_bad_input(coco, case, pattern):
    path, images = coco
    if case == "json":
        path.write_text('{"images": [],\n  "annotations": [,]}')
    elif case == "keys":
        break_file(path, lambda data: data.pop("categories"))
    elif case == "category":
        break_file(path, lambda data: data["annotations"][-1].update(category_id=99))
    elif case == "image_ref":
        break_file(path, lambda data: data["annotations"][1].update(image_id=77))
    elif case == "missing_image":
        (images / "20.png").unlink()
    elif case == "bbox":
        break_file(path, lambda data: data["annotations"][0].update(bbox=[1, 2, 3]))
    with pytest.raises(UserError, match=pattern) as error:
        read_coco(path, images)
    assert str(path) in str(error.value)


def test_bad_segmentation_named_when_decoded(coco):
    path, images = coco
    break_file(path, lambda data: data["annotations"][1].update(segmentation={"size": [30, 40], "counts": 5}))
    data = read_coco(path, images)  # masks are decoded when read
    with pytest.raises(UserError, match=r"annotation id 2 has a malformed 'segmentation'") as error:
        data[0]
    assert str(path) in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# evaluation


def pycocotools_stats(gt_path, results, iou_type):
    """pycocotools' own figures (percent, NaN for -1), straight from COCO/COCOeval."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [math.nan if v < 0 else v * 100 for v in evaluator.stats[:6]]


def ours(metrics, iou_type):
    return [metrics[f"{iou_type}_{name}"] for name in ("ap", "ap50", "ap75", "aps", "apm", "apl")]


def same(a, b):
    return all((math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-9) for x, y in zip(a, b))


def detections_of(data, shift=0):
    """Detections that repeat the ground truth (shift: boxes and masks moved right by `shift` pixels), and one
    false positive per image with a low score."""
    detections = []
    for index in range(len(data)):
        _, target = data[index]
        boxes = target["boxes"].clone()
        boxes[:, 0::2] = (boxes[:, 0::2] + shift)
        masks = target["masks"].roll(shift, -1).float()[:, None]
        count = len(boxes)
        height, width = target["masks"].shape[1:]
        boxes = torch.cat([boxes, torch.tensor([[0.0, 0.0, 5.0, 5.0]])])
        masks = torch.cat([masks, torch.zeros(1, 1, height, width)])
        masks[-1, 0, :5, :5] = 0.9
        detections.append({"boxes": boxes, "scores": torch.tensor([0.9] * count + [0.1]),
                           "labels": torch.cat([target["labels"], torch.tensor([1])]), "masks": masks})
    return detections


@pytest.fixture
def clean_gt(coco):
    path, images = coco
    path.write_text(json.dumps(annotations(clean=True)))
    return path, images


def test_perfect_predictions(clean_gt, tmp_path):
    gt_path, images = clean_gt
    data = read_coco(gt_path, images)
    detections = [{k: v for k, v in d.items()} for d in detections_of(data)]
    for detection in detections:  # no false positives
        for key in detection:
            detection[key] = detection[key][:-1]
    results = detections_to_coco_results(detections, data.image_ids, data.category_ids, with_masks=True)
    assert {r["category_id"] for r in results} == {3, 7}
    metrics = evaluate_coco(gt_path, results, ("bbox", "segm"))
    assert metrics["bbox_ap"] == pytest.approx(100) and metrics["segm_ap"] == pytest.approx(100)
    assert metrics["bbox_ap50"] == pytest.approx(100) and math.isnan(metrics["bbox_apl"])  # no large objects
    path = tmp_path / "results.json"
    write_coco_results(results, path)
    assert same(ours(metrics, "bbox"), pycocotools_stats(gt_path, str(path), "bbox"))
    assert same(evaluate_coco(gt_path, path, ("bbox",)).values(), ours(metrics, "bbox"))  # from the file


def test_shifted_predictions_match_pycocotools(clean_gt, tmp_path):
    gt_path, images = clean_gt
    data = read_coco(gt_path, images)
    results = detections_to_coco_results(detections_of(data, shift=2), data.image_ids, data.category_ids, True)
    assert results[0]["bbox"] == [4.0, 2.0, 10.0, 8.0] and isinstance(results[0]["segmentation"]["counts"], str)
    path = tmp_path / "results.json"
    write_coco_results(results, path)
    with contextlib.redirect_stdout(io.StringIO()):
        assert len(COCO(str(gt_path)).loadRes(str(path)).getAnnIds()) == len(results)  # loadable as COCO results
    metrics = evaluate_coco(gt_path, results, ("bbox", "segm"))
    assert 0 < metrics["bbox_ap"] < 100 and 0 < metrics["segm_ap"] < 100
    assert same(ours(metrics, "bbox"), pycocotools_stats(gt_path, str(path), "bbox"))
    # segm results go to COCOeval without boxes (the masks' own area decides the size range)
    segm_only = [{k: v for k, v in r.items() if k != "bbox"} for r in copy.deepcopy(results)]
    assert same(ours(metrics, "segm"), pycocotools_stats(gt_path, segm_only, "segm"))
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in copy.deepcopy(results)]
    assert detections_to_coco_results(detections_of(data, 2), data.image_ids, data.category_ids, False) == boxes_only


def test_empty_results(clean_gt):
    metrics = evaluate_coco(clean_gt[0], [], ("bbox", "segm"))
    assert metrics["bbox_ap"] == 0 and metrics["segm_ap50"] == 0 and len(metrics) == 12
    with pytest.raises(UserError, match="image ids"):
        evaluate_coco(clean_gt[0], [{"image_id": 999, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])


# ---------------------------------------------------------------------------------------------------------
# the digit scenes


def test_digit_scenes_coco(tmp_path, monkeypatch):
    monkeypatch.setattr(sd, "DIGIT_SCENES_TRAIN", 6)  # few scenes: the same generator, so the same first scenes
    monkeypatch.setattr(sd, "DIGIT_SCENES_VAL", 3)
    monkeypatch.setenv("BIFORMER_CACHE", str(tmp_path))
    files = digit_scenes_coco()
    root = sd.digit_scenes_folder()
    assert files["val"].images == root / "images" / "val"
    for split, count in (("train", 6), ("val", 3)):
        data = read_coco(files[split].annotations, files[split].images)
        assert data.classes == [str(d) for d in range(10)] and data.category_ids == list(range(1, 11))
        assert len(data) == count and data.problems.clipped == data.problems.degenerate == 0
        raw = json.loads(files[split].annotations.read_text())
        for index in range(count):
            image, target = data[index]
            semantic = torch.from_numpy(np.array(Image.open(root / "masks" / split / f"{index:04d}.png")))
            present = sorted(v for v in semantic.unique().tolist() if v)
            assert sorted(target["labels"].tolist()) == present and len(present) >= 2
            boxes = target["boxes"]
            assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= image.shape[2]).all()
            assert (boxes[:, 3] <= image.shape[1]).all() and (boxes[:, 2:] > boxes[:, :2]).all()
            for mask, label in zip(target["masks"], target["labels"]):
                assert mask.sum() > 0 and (semantic[mask.bool()] == label).all()
                assert torch.equal(mask.bool(), semantic == label)
        assert len(raw["annotations"]) == sum(len(data[i][1]["labels"]) for i in range(count))
    stamp = files["train"].annotations.stat().st_mtime_ns
    assert digit_scenes_coco()["train"].annotations.stat().st_mtime_ns == stamp  # written once
    assert not list(files["train"].annotations.parent.glob(".tmp-*"))
