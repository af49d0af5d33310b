"""Write a 2-D image folder of slices through the synthetic volumes' training cases: the images a 2-D BiFormer
learns from before it is inflated into `unet_biformer3d_*` (as medical models start from 2-D weights).

    python tools/volume_slices.py OUTPUT [--every 2]

Every `every`-th slice along each of the three axes of each training case of `--data synthetic-volumes` (never a
validation case: those score the 3-D models), classed by what it cuts: `empty`, `ball`, `box` or `ball_and_box`
(a class counts from MIN_VOXELS voxels of it in the slice). Grey levels: the volume's intensities, 0..1.2 mapped to
0..255. One training case in four gives the 2-D validation slices. OUTPUT/{train,val}/<class>/<case>_<axis><n>.png,
the layout `biformer train --data FOLDER` reads.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from biformer.data.volumes import read_decathlon, synthetic_volumes_folder  # noqa: E402
from biformer.files import output_folder, save_png  # noqa: E402

MIN_VOXELS = 20
SLICE_CLASSES = ("empty", "ball", "box", "ball_and_box")  # by (ball present) + 2 * (box present)
VALIDATION_EVERY = 4
BRIGHTEST = 1.2  # the synthetic volumes' intensities reach about 1.0 plus noise


def slice_class(labels: np.ndarray) -> str:
    """The class of one slice's labels (0 background, 1 ball, 2 box)."""
    ball, box = ((labels == value).sum() >= MIN_VOXELS for value in (1, 2))
    return SLICE_CLASSES[int(ball) + 2 * int(box)]


def write_slices(output: Path, every: int) -> dict[str, int]:
    """Write the folder; the number of slices per split."""
    import nibabel

    dataset = read_decathlon(str(synthetic_volumes_folder()))
    counts = {"train": 0, "val": 0}
    for index, case in enumerate(dataset.training):
        split = "val" if index % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
        image = np.asarray(nibabel.load(case.image).dataobj, dtype=np.float32)
        labels = np.asarray(nibabel.load(case.label).dataobj)
        grey = (image / BRIGHTEST * 255).clip(0, 255).astype(np.uint8)
        stem = case.image.name.removesuffix(".nii.gz")
        for axis in range(3):
            for position in range(0, image.shape[axis], every):
                take = [slice(None)] * 3
                take[axis] = position
                folder = output / split / slice_class(labels[tuple(take)])
                folder.mkdir(parents=True, exist_ok=True)
                save_png(Image.fromarray(grey[tuple(take)]), folder / f"{stem}_{'xyz'[axis]}{position:02d}.png")
                counts[split] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the folder to write into")
    parser.add_argument("--every", type=int, default=2, help="keep every n-th slice along each axis")
    args = parser.parse_args()
    if args.every < 1:
        parser.error(f"--every must be at least 1, got {args.every}")
    counts = write_slices(output_folder(args.output, "OUTPUT"), args.every)
    print(f"{counts['train']} training and {counts['val']} validation slices in {args.output}")


if __name__ == "__main__":
    main()
