"""Cut the digits out of the digit-scenes into a 10-class image folder: a classifier trained on it has seen the
scenes' own digits (their background, scale and noise), the backbone to start a detection model from.

    python tools/scene_crops.py OUTPUT [--size 32] [--margin 0.15]

Every instance box of the scenes' training split becomes OUTPUT/train/<digit>/<n>.png, of the validation split
OUTPUT/val/<digit>/<n>.png: the box grown by `margin` of its longer side on each side, made square around its
centre (clipped to the scene) and resized to size x size. The layout is the one `biformer train --data FOLDER`
reads.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from biformer.data.scenes import digit_scenes_coco  # noqa: E402
from biformer.files import output_folder, save_png  # noqa: E402


def square_box(box: list[float], margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """A COCO [x, y, w, h] box as a square (left, top, right, bottom) around its centre, grown by the margin."""
    x, y, w, h = box
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = x + w / 2, y + h / 2
    left, top = max(0, round(cx - side / 2)), max(0, round(cy - side / 2))
    return left, top, min(width, round(cx + side / 2)), min(height, round(cy + side / 2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--margin", type=float, default=0.15)
    args = parser.parse_args()
    output_folder(args.output, "OUTPUT")
    for split, files in digit_scenes_coco().items():
        data = json.loads(files.annotations.read_text(encoding="utf-8"))
        names = {category["id"]: category["name"] for category in data["categories"]}
        images = {image["id"]: image for image in data["images"]}
        counts: Counter[str] = Counter()
        for annotation in data["annotations"]:
            record = images[annotation["image_id"]]
            digit = names[annotation["category_id"]]
            with Image.open(files.images / record["file_name"]) as scene:
                box = square_box(annotation["bbox"], args.margin, record["width"], record["height"])
                crop = scene.convert("RGB").crop(box).resize((args.size, args.size), Image.BICUBIC)
            folder = args.output / split / digit
            folder.mkdir(parents=True, exist_ok=True)
            save_png(crop, folder / f"{counts[digit]}.png")
            counts[digit] += 1
        print(f"{split}: {sum(counts.values())} crops, " + ", ".join(f"{d}: {n}" for d, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
