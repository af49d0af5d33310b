"""Image files: which files are images, what counts as an unreadable one, and decoding them to RGB."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

# what PIL raises for a file it cannot decode (truncated, corrupt, not an image); ImportError: ultralytics, once
# imported, patches PIL.Image.open to load a HEIF decoder (pi-heif) for a file PIL cannot identify, and where that
# decoder cannot be installed the import error is what reaches us
UNREADABLE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, ImportError)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grey PNG/TIFF (PIL opens some as 32-bit "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `image`. 16-bit grey images are scaled from 0..65535 to 0..255 (PIL's own
    convert("RGB") clips them at 255, which turns almost every pixel white)."""
    if image.mode in WIDE_GREY_MODES:
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(wide / 257), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":  # floating-point grey: taken as 0..1
        image = Image.fromarray(np.clip(np.rint(np.asarray(image) * 255), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """The image file at `path` decoded to 8-bit RGB (see `to_rgb`); raises one of UNREADABLE_ERRORS if it
    cannot be decoded."""
    with Image.open(path) as file:
        file.load()
        return to_rgb(file)


def readable_image(item: Image.Image | str | os.PathLike) -> tuple[Image.Image | None, str]:
    """(image, "") for an in-memory image or a file that decodes; (None, "path: reason") for one that does not."""
    if isinstance(item, Image.Image):
        return item, ""
    try:
        return open_rgb(item), ""
    except UNREADABLE_ERRORS as error:
        return None, f"{item}: {error}"


def list_images(inputs: list[str]) -> list[str]:
    """Image files named directly or found (recursively) in named folders."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            files += sorted(str(p) for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise UserError(f"{item!r} is neither an image file nor a folder")
    if not files:
        raise UserError(f"no images found in {inputs}")
    return files
