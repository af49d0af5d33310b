"""digit-scenes: 128x128 scenes of 2-5 digits on noisy backgrounds with their class masks, generated once
into a cache folder in the generic segmentation layout (images/{train,val}/, masks/{train,val}/, classes.txt),
and their COCO instances derived from the masks (`digit_scenes_coco`). Generation only: the segmentation and
COCO readers read them as any folder of their layouts."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from ..errors import OutputError, UserError
from ..files import atomic_output
from ..progress import progress
from .cache import cached_folder
from .digits import load_digits_split

DIGIT_SCENES_NAME = "digit-scenes-v2"  # a new version of the generator gets a new name: old caches stay valid
DIGIT_SCENES_SIZE = 128
DIGIT_SCENES_TRAIN = 480
DIGIT_SCENES_VAL = 120
DIGIT_SCENES_SEED = 0
DIGIT_SCENES_CLASSES = ["background", *(str(d) for d in range(10))]
DIGIT_SCENES_MEAN = DIGIT_SCENES_STD = (0.5, 0.5, 0.5)


def digit_scenes_folder() -> Path:
    """The digit-scenes data set in the generic folder layout, generated on first use into the cache
    ($BIFORMER_CACHE or ~/.cache/biformer)."""
    return cached_folder(DIGIT_SCENES_NAME, _write_digit_scenes)


def _write_digit_scenes(folder: Path) -> None:
    """Generate the scenes (train scenes from the train-split digits only, val from val) into `folder`."""
    train_images, train_labels, val_images, val_labels = load_digits_split()
    rng = np.random.default_rng(DIGIT_SCENES_SEED)
    splits = (("train", train_images, train_labels, DIGIT_SCENES_TRAIN),
              ("val", val_images, val_labels, DIGIT_SCENES_VAL))
    # the bar shows only if generation is slow (delay) and stderr is a terminal
    with progress(total=DIGIT_SCENES_TRAIN + DIGIT_SCENES_VAL, desc="generating digit scenes", delay=2.0) as bar:
        for split, images, labels, count in splits:
            glyphs = np.stack([np.asarray(image, dtype=np.float32)[..., 0] / 255 for image in images])
            labels = np.asarray(labels)
            for part in ("images", "masks"):
                (folder / part / split).mkdir(parents=True)
            for index in range(count):
                scene, mask = _digit_scene(rng, glyphs, labels)
                # fast compression: noisy scenes barely compress, and generation time counts
                Image.fromarray(scene).save(folder / "images" / split / f"{index:04d}.png", compress_level=1)
                Image.fromarray(mask).save(folder / "masks" / split / f"{index:04d}.png", compress_level=1)
                bar.update()
    (folder / "classes.txt").write_text("\n".join(DIGIT_SCENES_CLASSES) + "\n", encoding="utf-8")


def _noisy_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark random colour with faint blobs, faint lines and, later, noise: no trivially flat background."""
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = rng.uniform(0.0, 0.35, 3)
    axis = np.arange(size, dtype=np.float32)
    for _ in range(rng.integers(2, 6)):
        cy, cx, sigma = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(6, 24)
        # a Gaussian blob is the outer product of two 1-d Gaussians, their invisible tails cut to 0
        # (float32 denormals there would make the arithmetic many times slower)
        rows, columns = (np.exp(-((axis - centre) ** 2) / (2 * sigma**2)) for centre in (cy, cx))
        bump = np.outer(np.where(rows > 1e-3, rows, 0), np.where(columns > 1e-3, columns, 0))
        canvas += bump[..., None] * rng.uniform(-0.08, 0.12, 3).astype(np.float32)
    lines = Image.new("L", (size, size))
    draw = ImageDraw.Draw(lines)
    for _ in range(rng.integers(1, 4)):
        draw.line([tuple(rng.integers(0, size, 2).tolist()), tuple(rng.integers(0, size, 2).tolist())],
                  fill=255, width=int(rng.integers(1, 3)))
    canvas += (np.asarray(lines, np.float32) / 255)[..., None] * rng.uniform(0.05, 0.15, 3).astype(np.float32)
    return canvas


def _digit_scene(rng: np.random.Generator, glyphs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 scene, uint8 mask) pair with 2-5 digits of distinct classes in boxes that do not
    overlap (a digit that finds no free place in a few tries is left out; a scene with fewer than two is
    drawn again). Each glyph is blended in by its own intensity, so a digit is its strokes, not a box."""
    size = DIGIT_SCENES_SIZE
    while True:
        canvas, mask = _noisy_background(rng, size), np.zeros((size, size), np.uint8)
        taken = np.zeros((size, size), bool)
        for digit in rng.choice(10, size=int(rng.integers(2, 6)), replace=False):
            side = int(rng.integers(20, 57))
            for _ in range(20):
                top, left = rng.integers(0, size - side + 1, 2)
                if not taken[top : top + side, left : left + side].any():
                    break
            else:
                continue
            taken[top : top + side, left : left + side] = True
            glyph = glyphs[rng.choice(np.flatnonzero(labels == digit))]
            big = np.asarray(Image.fromarray(glyph).resize((side, side), Image.Resampling.BICUBIC))
            # the 8x8 glyphs' faint rims would show as a box: ramp the opacity from a quarter to 3/4 intensity
            alpha = np.clip((big / big.max() - 0.25) * 2, 0, 1)[..., None]
            region = canvas[top : top + side, left : left + side]
            region[:] = region * (1 - alpha) + rng.uniform(0.55, 1.0, 3).astype(np.float32) * alpha
            mask[top : top + side, left : left + side][alpha[..., 0] > 0.5] = digit + 1
        if np.count_nonzero(np.unique(mask)) >= 2:
            break
    canvas += 0.04 * rng.standard_normal(canvas.shape, dtype=np.float32)
    return np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8), mask


# ---------------------------------------------------------------------------------------------------------
# the digit scenes in COCO's format

DIGIT_SCENES_COCO = "coco"  # the annotation folder inside the digit-scenes cache folder
DIGIT_SCENES_CATEGORIES = [{"id": digit + 1, "name": str(digit), "supercategory": "digit"} for digit in range(10)]


@dataclass(frozen=True)
class CocoFiles:
    annotations: Path  # the instances JSON
    images: Path  # the folder of its images


def _digit_scenes_instances(image_folder: Path, mask_folder: Path) -> dict[str, Any]:
    """COCO instances of one digit-scenes split: one object per digit class present in a scene's mask."""
    images, annotations = [], []
    for image_id, mask_path in enumerate(sorted(mask_folder.glob("*.png")), 1):
        mask = np.asarray(Image.open(mask_path))
        height, width = mask.shape
        images.append({"id": image_id, "file_name": mask_path.name, "width": width, "height": height})
        for value in np.unique(mask):
            if value == 0:
                continue
            rle = mask_utils.encode(np.asfortranarray(mask == value, dtype=np.uint8))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(value),  # value = digit + 1
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask_utils.area(rle)),
                "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")}, "iscrowd": 0,
            })
        if not (image_folder / mask_path.name).is_file():
            raise UserError(f"digit-scenes image {str(image_folder / mask_path.name)!r} is missing; delete the "
                            f"cache folder {str(image_folder.parent.parent)!r} to generate it again")
    return {"info": {"description": "digit scenes (biformer), instances from the semantic masks"},
            "images": images, "annotations": annotations, "categories": DIGIT_SCENES_CATEGORIES}


def digit_scenes_coco() -> dict[str, CocoFiles]:
    """{"train": CocoFiles, "val": CocoFiles} of the digit scenes: the annotation files are derived from the
    cached scenes' masks on first use and written (atomically) to <digit-scenes folder>/coco/; the images are
    the scenes' own. Category ids 1..10 are the digits "0".."9" (= the semantic masks' values)."""
    root = digit_scenes_folder()
    folder = root / DIGIT_SCENES_COCO
    files = {split: CocoFiles(folder / f"instances_{split}.json", root / "images" / split) for split in ("train", "val")}
    for split, paths in files.items():
        if paths.annotations.is_file():
            continue
        try:
            folder.mkdir(exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create {str(folder)!r}: {error.strerror or error}; set BIFORMER_CACHE to a "
                              "writable folder") from error
        data = _digit_scenes_instances(paths.images, root / "masks" / split)
        with atomic_output(paths.annotations) as temp:
            temp.write_text(json.dumps(data), encoding="utf-8")
    return files
