"""The embedded digits: scikit-learn's 8x8 digits as RGB images, with a fixed stratified split."""
from __future__ import annotations

import numpy as np
from PIL import Image

DIGITS_MEAN = DIGITS_STD = (0.5, 0.5, 0.5)


def _digits() -> tuple[list[Image.Image], np.ndarray]:
    """scikit-learn's bundled 8x8 digits as RGB images, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(digits.images * 16, 0, 255).astype(np.uint8)  # values 0..16 -> 0..255
    return [Image.fromarray(p, mode="L").convert("RGB") for p in pixels], digits.target


def digit_image(index: int) -> Image.Image:
    """Digit `index` (0..1796) of the bundled data set, as an 8x8 RGB image."""
    images, _ = _digits()
    if not 0 <= index < len(images):
        raise IndexError(f"digit index {index} is outside 0..{len(images) - 1}")
    return images[index]


def load_digits_split() -> tuple[list[Image.Image], list[int], list[Image.Image], list[int]]:
    """The bundled digits with a fixed stratified 80/20 split."""
    from sklearn.model_selection import train_test_split

    images, targets = _digits()
    train_idx, val_idx = train_test_split(
        np.arange(len(images)), test_size=0.2, stratify=targets, random_state=0
    )
    pick = lambda idx: ([images[i] for i in idx], [int(targets[i]) for i in idx])  # noqa: E731
    return (*pick(train_idx), *pick(val_idx))
