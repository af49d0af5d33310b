"""Write a 10-class image folder of typeset digits: a data set from another source than the bundled handwritten
ones, for fine-tuning experiments.

    python tools/typeset_digits.py OUTPUT [--train-per-class 60] [--val-per-class 20] [--size 32] [--seed 0]

Each image is one digit drawn with Pillow's built-in FreeType font at a random size, position, rotation and
shade on a random background, with a little noise: OUTPUT/{train,val}/<digit>/<n>.png. The layout is the one
`biformer train --data FOLDER` reads.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from biformer.files import output_folder, save_png  # noqa: E402


def typeset(digit: int, size: int, rng: random.Random) -> Image.Image:
    """One digit, size x size pixels, grey levels."""
    canvas = 2 * size  # drawn larger, rotated, then cropped around the centre and shrunk
    background, ink = rng.randint(0, 90), rng.randint(160, 255)
    if rng.random() < 0.5:
        background, ink = 255 - background, 255 - ink
    image = Image.new("L", (canvas, canvas), background)
    font = ImageFont.load_default(size=rng.randint(int(canvas * 0.55), int(canvas * 0.85)))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
    x = (canvas - (right - left)) / 2 - left + rng.uniform(-0.12, 0.12) * canvas
    y = (canvas - (bottom - top)) / 2 - top + rng.uniform(-0.12, 0.12) * canvas
    draw.text((x, y), str(digit), fill=ink, font=font)
    image = image.rotate(rng.uniform(-20, 20), resample=Image.BICUBIC, fillcolor=background)
    image = image.resize((size, size), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) + np.random.default_rng(rng.getrandbits(32)).normal(0, 8, (size, size))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    output_folder(args.output, "OUTPUT")
    rng = random.Random(args.seed)
    for split, count in (("train", args.train_per_class), ("val", args.val_per_class)):
        for digit in range(10):
            folder = args.output / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                save_png(typeset(digit, args.size, rng), folder / f"{n}.png")
    print(f"wrote {10 * (args.train_per_class + args.val_per_class)} images into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
