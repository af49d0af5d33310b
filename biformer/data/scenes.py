"""digit-scenes: 128x128 scenes of 2-5 digits on noisy backgrounds with their class masks, generated once
into a cache folder in the generic segmentation layout (images/{train,val}/, masks/{train,val}/, classes.txt)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from ..errors import OutputError
from ..progress import progress
from .digits import load_digits_split

DIGIT_SCENES_NAME = "digit-scenes-v2"  # a new version of the generator gets a new name: old caches stay valid
DIGIT_SCENES_SIZE = 128
DIGIT_SCENES_TRAIN = 480
DIGIT_SCENES_VAL = 120
DIGIT_SCENES_SEED = 0
DIGIT_SCENES_CLASSES = ["background", *(str(d) for d in range(10))]
DIGIT_SCENES_MEAN = DIGIT_SCENES_STD = (0.5, 0.5, 0.5)


def cache_root() -> Path:
    """Where generated data sets and files are kept: $BIFORMER_CACHE, else ~/.cache/biformer."""
    return Path(os.environ.get("BIFORMER_CACHE") or Path.home() / ".cache" / "biformer")


def digit_scenes_folder() -> Path:
    """The digit-scenes data set in the generic folder layout, generated on first use into the cache
    ($BIFORMER_CACHE or ~/.cache/biformer)."""
    return cached_folder(DIGIT_SCENES_NAME, _write_digit_scenes)


def cached_folder(name: str, write: Callable[[Path], None]) -> Path:
    """The cache folder `name`, filled by `write(folder)` on first use. It is written to a temporary folder and
    renamed into place when complete, so an interrupted generation leaves nothing that looks finished."""
    final = cache_root() / name
    if final.is_dir():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    except OSError as error:
        raise OutputError(f"cannot create the cache folder {str(final.parent)!r}: "
                          f"{error.strerror or error}; set BIFORMER_CACHE to a writable folder") from error
    try:
        write(temp)
        os.replace(temp, final)
    except OSError as error:
        if final.is_dir():  # another process finished first: its folder is as good as ours
            return final
        raise OutputError(f"cannot write the cache folder {str(final)!r}: {error.strerror or error}; "
                          "set BIFORMER_CACHE to a writable folder") from error
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # nothing left after a successful rename
    return final


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
