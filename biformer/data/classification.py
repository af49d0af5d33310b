"""Data sets for training and evaluation: the embedded digits, or an ImageNet-style image folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from timm.data import create_transform
from torch.utils.data import Dataset, default_collate

from ..errors import UserError
from .digits import DIGITS_MEAN, DIGITS_STD, load_digits_split
from .images import IMAGE_EXTENSIONS, readable_image


class ImageListDataset(Dataset):
    """(image, label, problem) triples from in-memory images or image files, with a transform.

    Files are decoded when they are read, not when the folder is scanned (a scan that decodes
    would take hours on ImageNet, and one that only checks headers misses truncated files). A
    file that cannot be decoded gives image None and problem "path: reason"; `collate_readable`
    drops it from the batch and passes the problem on, so the caller reports and counts it.
    """

    def __init__(self, images: list, labels: list[int], transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str]:
        image, problem = readable_image(self.images[index])
        if image is None:
            return None, self.labels[index], problem
        return (self.transform(image) if self.transform else image), self.labels[index], ""


def collate_readable(samples: list[tuple]) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """Batch the readable samples: (images, labels, problems of the unreadable ones)."""
    readable = [(image, label) for image, label, _ in samples if image is not None]
    problems = [problem for image, _, problem in samples if image is None]
    images, labels = default_collate(readable) if readable else (None, None)
    return images, labels, problems


@dataclass
class DataSplits:
    train: ImageListDataset
    val: ImageListDataset
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float


def scan_class_folders(root: Path, classes: list[str] | None, members: Callable[[Path], list[Path]] | None = None,
                       what: str = f"image files ({', '.join(IMAGE_EXTENSIONS)})", item: str = "image"
                       ) -> tuple[list[str], list[Path], list[int]]:
    """(classes, members, labels) of root/<class>/<item>; members(class folder) lists a class's items (default:
    its image files, searched recursively), `what` names them in messages. UserError for a missing folder, no
    classes, a class without items, or (given the training classes) missing or extra classes."""
    if not root.is_dir():
        raise UserError(f"data folder {str(root)!r} does not exist")
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not found:
        raise UserError(f"data folder {str(root)!r} has no class sub-folders (expected {root}/<class>/<{item}>)")
    if classes is None:
        classes = found
    else:
        missing = sorted(set(classes) - set(found))
        if missing:
            raise UserError(f"class folder(s) {missing} of the training set are missing from {str(root)!r}")
        extra = sorted(set(found) - set(classes))
        if extra:
            raise UserError(f"{str(root)!r} has class folder(s) {extra} that the training set does not have")
    members = members or (lambda folder: sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS))
    paths, labels = [], []
    for label, name in enumerate(classes):
        found_items = members(root / name)
        if not found_items:  # as torchvision's ImageFolder: a class without images is a mistake, not a class
            raise UserError(f"class folder {str(root / name)!r} holds no {what}")
        paths += found_items
        labels += [label] * len(found_items)
    return classes, paths, labels


def build_datasets(
    data: str,
    img_size: int,
    *,
    auto_augment: str | None = None,
    random_erasing: float = 0.0,
    crop_scale: tuple[float, float] | None = None,
    hflip: float | None = None,
    eval_only: bool = False,
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> DataSplits:
    """Train/val data sets for `data` = "digits" or a folder with train/ and val/ (ImageNet layout).

    Digits are upscaled to img_size; their training augmentation is a mild random resized crop
    (no flips: a mirrored digit is another symbol). Folders get timm's ImageNet transforms.
    normalization: (mean, std) of the model's inputs (None: the data set's own, 0.5 for digits, else ImageNet's).
    crop_scale, hflip: the training crop's area range and flip probability (None: the data set's own, as above).
    """
    if data == "digits":
        train_images, train_labels, val_images, val_labels = load_digits_split()
        classes, (mean, std) = [str(i) for i in range(10)], normalization or (DIGITS_MEAN, DIGITS_STD)
        train_tf = create_transform(
            img_size, is_training=True, scale=crop_scale or (0.75, 1.0), ratio=(0.85, 1.18),
            hflip=0.0 if hflip is None else hflip, color_jitter=None,
            auto_augment=auto_augment, re_prob=random_erasing, interpolation="bicubic", mean=mean, std=std,
        )
        crop_pct = 1.0
        val_tf = create_transform(img_size, interpolation="bicubic", crop_pct=crop_pct, mean=mean, std=std)
    else:
        root = Path(data)
        if not root.is_dir():
            raise UserError(f"--data {data!r} is neither 'digits' nor an existing folder")
        for part in ("val",) if eval_only else ("train", "val"):
            if not (root / part).is_dir():
                raise UserError(f"data folder {data!r} has no {part}/ sub-folder (expected {data}/{part}/<class>/<image>)")
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        mean, std = normalization or (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        if eval_only:
            classes = None
            train_images, train_labels = [], []
        else:
            classes, train_images, train_labels = scan_class_folders(root / "train", None)
        classes, val_images, val_labels = scan_class_folders(root / "val", classes)
        train_tf = create_transform(
            img_size, is_training=True, scale=crop_scale or (0.08, 1.0), hflip=0.5 if hflip is None else hflip,
            auto_augment=auto_augment, re_prob=random_erasing, interpolation="bicubic", mean=mean, std=std,
        )
        crop_pct = 0.875
        val_tf = create_transform(img_size, interpolation="bicubic", crop_pct=crop_pct, mean=mean, std=std)
    return DataSplits(
        train=ImageListDataset(train_images, train_labels, train_tf),
        val=ImageListDataset(val_images, val_labels, val_tf),
        classes=classes,
        mean=tuple(mean),
        std=tuple(std),
        crop_pct=crop_pct,
    )

