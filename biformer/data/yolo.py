"""digit-scenes in the YOLO layout, for Ultralytics: images/{train,val}/*.png, labels/{train,val}/*.txt (one
"class x_center y_center width height" line per digit, normalised to the image) and data.yaml.

The boxes are the ones of the COCO files (`digit_scenes_coco`), so every detector here trains on the same objects.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .cache import cached_folder
from .scenes import DIGIT_SCENES_NAME, digit_scenes_coco

DIGIT_SCENES_YOLO_NAME = f"{DIGIT_SCENES_NAME}-yolo"
DIGIT_SCENES_YOLO_CLASSES = [str(digit) for digit in range(10)]  # YOLO class c is the digit c (COCO id c + 1)


def digit_scenes_yolo() -> Path:
    """The data set YAML of digit-scenes in the YOLO layout, written once into the cache next to the scenes."""
    return cached_folder(DIGIT_SCENES_YOLO_NAME, _write_yolo_layout) / "data.yaml"


def _write_yolo_layout(folder: Path) -> None:
    for split, files in digit_scenes_coco().items():
        coco = json.loads(files.annotations.read_text(encoding="utf-8"))
        boxes: dict[int, list[str]] = {image["id"]: [] for image in coco["images"]}
        sizes = {image["id"]: (image["width"], image["height"]) for image in coco["images"]}
        for annotation in coco["annotations"]:
            width, height = sizes[annotation["image_id"]]
            left, top, box_width, box_height = annotation["bbox"]
            boxes[annotation["image_id"]].append(
                f"{annotation['category_id'] - 1} {(left + box_width / 2) / width:.6f} {(top + box_height / 2) / height:.6f} "
                f"{box_width / width:.6f} {box_height / height:.6f}")
        (folder / "images" / split).mkdir(parents=True)
        (folder / "labels" / split).mkdir(parents=True)
        for image in coco["images"]:
            source = files.images / image["file_name"]
            target = folder / "images" / split / image["file_name"]
            try:
                os.link(source, target)  # the scenes' own files where the file system allows it
            except OSError:
                shutil.copyfile(source, target)
            label = (folder / "labels" / split / image["file_name"]).with_suffix(".txt")
            label.write_text("".join(line + "\n" for line in boxes[image["id"]]), encoding="utf-8")
    names = "".join(f"  {index}: '{name}'\n" for index, name in enumerate(DIGIT_SCENES_YOLO_CLASSES))
    # `path` is where the data set lies once renamed into place (this folder is its temporary name)
    final = folder.parent / DIGIT_SCENES_YOLO_NAME
    (folder / "data.yaml").write_text(
        f"# digit-scenes (biformer) in the YOLO layout\npath: {json.dumps(str(final))}\ntrain: images/train\nval: images/val\n"
        f"names:\n{names}", encoding="utf-8")
