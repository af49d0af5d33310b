"""Tiny data folders that tests train and evaluate on, made on the fly: 64x64 scenes of a bright square and a dark
bar on grey, as a segmentation mask folder or in COCO's layout."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CLASSES = ("square", "bar")  # COCO category ids 4 and 9 (not 1..K, to check the mapping back)
CATEGORY_IDS = (4, 9)


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def make_mask_folder(root: Path, train: int = 8, val: int = 4, *, classes: str = "background\nsquare\nbar\n",
                     image_suffix: str = ".jpg", val_ignored: bool = False) -> Path:
    """A generic-layout segmentation folder: the square is class 1, the bar class 2, pixel (0, 0) ignored (255);
    classes: classes.txt's text (written as UTF-8 bytes, as given); val_ignored: every validation pixel is 255."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_bytes(classes.encode("utf-8"))
    for part, count in (("train", train), ("val", val)):
        (root / "images" / part).mkdir(parents=True)
        (root / "masks" / part).mkdir(parents=True)
        for index in range(count):
            image = np.full((64, 64, 3), 120, np.uint8) + rng.integers(0, 20, (64, 64, 3), dtype=np.uint8)
            mask = np.zeros((64, 64), np.uint8)
            top, left = rng.integers(0, 40, 2)
            image[top:top + 20, left:left + 20], mask[top:top + 20, left:left + 20] = 250, 1
            row = rng.integers(0, 56)
            image[row:row + 6, :], mask[row:row + 6, :] = 10, 2
            mask[0, 0] = 255
            if part == "val" and val_ignored:
                mask[:] = 255
            Image.fromarray(image).save(root / "images" / part / f"{index}{image_suffix}")
            Image.fromarray(mask).save(root / "masks" / part / f"{index}.png")
    return root


def make_coco_folder(root: Path, train: int = 6, val: int = 3, *, negative: bool = True,
                     edit: Callable[[str, dict], None] | None = None) -> Path:
    """COCO's layout: the square is category 4, the bar category 9, masks as RLE. negative: the last validation
    image has no object; edit(split, data) may change an annotation file's content before it is written."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True)
    for split, count in (("train", train), ("val", val)):
        (root / split).mkdir()
        images, annotations = [], []
        for index in range(count):
            image = np.full((64, 64, 3), 120, np.uint8) + rng.integers(0, 20, (64, 64, 3), dtype=np.uint8)
            objects = []
            if not (negative and split == "val" and index == count - 1):
                top, left = (int(v) for v in rng.integers(0, 40, 2))
                image[top:top + 20, left:left + 20] = 250
                objects.append((4, left, top, 20, 20))
                row = int(rng.integers(0, 48))
                image[row:row + 16, 8:14] = 10
                objects.append((9, 8, row, 6, 16))
            Image.fromarray(image).save(root / split / f"{index}.png")
            images.append({"id": 100 + index, "file_name": f"{index}.png", "width": 64, "height": 64})
            for category, x, y, w, h in objects:
                mask = np.zeros((64, 64), np.uint8)
                mask[y:y + h, x:x + w] = 1
                rle = mask_utils.encode(np.asfortranarray(mask))
                annotations.append({"id": len(annotations) + 1, "image_id": 100 + index, "category_id": category,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                                    "segmentation": {"size": [64, 64], "counts": rle["counts"].decode("ascii")}})
        data = {"images": images, "annotations": annotations,
                "categories": [{"id": i, "name": n} for i, n in zip(CATEGORY_IDS, CLASSES)]}
        if edit is not None:
            edit(split, data)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def make_image_folder(root: Path, per_class: int = 2) -> Path:
    """An ImageNet-layout folder root/{train,val}/{dark,bright}/<n>.png of 40x40 images."""
    for part in ("train", "val"):
        for value, name in ((30, "dark"), (220, "bright")):
            (root / part / name).mkdir(parents=True)
            for index in range(per_class):
                Image.fromarray(np.full((40, 40, 3), value + index, np.uint8)).save(root / part / name / f"{index}.png")
    return root
