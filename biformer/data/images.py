"""Image files: which files are images, what counts as an unreadable one, and decoding them to RGB."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

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


def list_inputs(inputs: list[str], found: Callable[[Path], bool], what: str, plural: str,
                named: Callable[[Path], bool] = Path.is_file) -> list[str]:
    """The inputs a command reads: each path given that `named` accepts (default: any file), else, for a folder,
    its members (searched recursively, sorted) that `found` accepts. UserError naming `what` an input must be for a
    path that is neither, and the `plural` for no input at all."""
    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if named(path):
            files.append(item)
        elif path.is_dir():
            files += sorted(os.fspath(member) for member in path.rglob("*") if found(member))
        else:
            raise UserError(f"{item!r} is neither {what} nor a folder")
    if not files:
        raise UserError(f"no {plural} found in {inputs}")
    return files


def list_images(inputs: list[str]) -> list[str]:
    """Image files named directly or found (recursively) in named folders."""
    return list_inputs(inputs, lambda path: path.suffix.lower() in IMAGE_EXTENSIONS, "an image file", "images")
