"""Semantic segmentation data: the embedded digit scenes, a generic image/mask folder, or ADE20K.

All three load through one code path: the digit scenes are generated once into a cache folder
in the generic layout (images/{train,val}/, masks/{train,val}/, classes.txt), and ADE20K differs
only in its folder names and in how its annotation files code the classes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import ColorJitter, InterpolationMode

from ..errors import UserError
from .images import IMAGE_EXTENSIONS, UNREADABLE_ERRORS, open_rgb
from .scenes import DIGIT_SCENES_MEAN, DIGIT_SCENES_STD, digit_scenes_folder

IGNORE_INDEX = 255
PAD_MULTIPLE = 32  # batches are padded to a multiple of the backbone's total stride
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]
FOLDER_HELP = "images/{train,val}/<name>.<ext>, masks/{train,val}/<name>.png and classes.txt"
ADE20K_HELP = "ADEChallengeData2016/images/{training,validation}/*.jpg and annotations/{training,validation}/*.png"


@dataclass
class MaskBatch:
    """A batch's masks (padded with IGNORE_INDEX), and per sample the size its image had inside the padded
    image batch and the size of its own mask, before padding."""

    masks: Tensor
    image_sizes: list[tuple[int, int]]
    mask_sizes: list[tuple[int, int]]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskBatch:
        return MaskBatch(self.masks.to(device, non_blocking=non_blocking), self.image_sizes, self.mask_sizes)

    def __len__(self) -> int:
        return len(self.masks)


@dataclass
class SegmentationSplits:
    train: Dataset
    val: Dataset
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str  # "folder", "ade20k" or "digit-scenes"
    flip: bool  # whether horizontal flips are valid augmentation (a mirrored digit is another symbol)
    img_size: int  # the shorter side images are resized to


@dataclass(frozen=True)
class _MaskCoding:
    """How a layout's mask files code classes: file value -> class index or IGNORE_INDEX, and the allowed values."""

    lookup: np.ndarray  # (256,) uint8
    allowed: np.ndarray  # (256,) bool
    rule: str  # the allowed values, in words, for the error message


def _folder_coding(num_classes: int) -> _MaskCoding:
    values = np.arange(256)
    return _MaskCoding(
        values.astype(np.uint8), (values < num_classes) | (values == IGNORE_INDEX),
        f"that are neither a class index (0..{num_classes - 1}: classes.txt lists {num_classes} classes) nor "
        f"{IGNORE_INDEX} (ignore); fix the mask or add the missing classes to classes.txt",
    )


def _ade20k_coding() -> _MaskCoding:
    values = np.arange(256)
    # 0 = unlabelled -> IGNORE_INDEX (255 after the wrap-around), 1..150 -> class 0..149
    return _MaskCoding(
        ((values - 1) % 256).astype(np.uint8), values <= len(ADE20K_CLASSES),
        f"above {len(ADE20K_CLASSES)} (ADE20K codes 0 = unlabelled, 1..{len(ADE20K_CLASSES)} = classes); "
        "is this the ADEChallengeData2016 release?",
    )


class TrainTransform:
    """mmseg-style training augmentation on an (image, mask) pair: random rescale to 0.5..2x of the scale
    that makes the shorter side img_size, random img_size crop, optional horizontal flip, photometric
    jitter of the image; padding (image 0 after normalization, mask IGNORE_INDEX) where the rescaled
    image is smaller than the crop. Randomness from python's and torch's global generators."""

    def __init__(self, img_size: int, mean: tuple[float, ...], std: tuple[float, ...], flip: bool) -> None:
        self.img_size, self.mean, self.std, self.flip = img_size, mean, std, flip
        self.jitter = ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05)

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[Tensor, Tensor]:
        width, height = image.size
        scale = self.img_size / min(width, height) * random.uniform(0.5, 2.0)
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        image = F.resize(image, size, InterpolationMode.BILINEAR)
        mask = F.resize(mask, size, InterpolationMode.NEAREST)
        crop_h, crop_w = min(self.img_size, size[0]), min(self.img_size, size[1])
        top, left = random.randint(0, size[0] - crop_h), random.randint(0, size[1] - crop_w)
        image, mask = F.crop(image, top, left, crop_h, crop_w), F.crop(mask, top, left, crop_h, crop_w)
        if self.flip and random.random() < 0.5:
            image, mask = F.hflip(image), F.hflip(mask)
        image = F.normalize(F.to_tensor(self.jitter(image)), self.mean, self.std)
        padding = (0, self.img_size - crop_w, 0, self.img_size - crop_h)  # left, right, top, bottom
        image = torch.nn.functional.pad(image, padding, value=0.0)
        mask = torch.nn.functional.pad(torch.from_numpy(np.array(mask)).long(), padding, value=IGNORE_INDEX)
        return image, mask


class ValTransform:
    """The image resized so that its shorter side is img_size, normalized; the mask as it is (metrics
    are computed at the annotation's resolution)."""

    def __init__(self, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.img_size, self.mean, self.std = img_size, mean, std

    def image(self, image: Image.Image) -> Tensor:
        """The network input of an image (also what `biformer predict` feeds a segmentation model)."""
        if min(image.size) != self.img_size:
            image = F.resize(image, self.img_size, InterpolationMode.BILINEAR)
        return F.normalize(F.to_tensor(image), self.mean, self.std)

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[Tensor, Tensor]:
        return self.image(image), torch.from_numpy(np.array(mask)).long()


class SegmentationDataset(Dataset):
    """(image, mask, problem) triples from image and mask files, decoded when read.

    An undecodable file gives (None, None, "path: reason"), reported and counted by the caller as for
    classification. A mask that decodes but does not fit its image (other size, values that are no
    class) raises UserError: the data set is wrong, not one damaged file.
    """

    def __init__(self, images: list[Path], masks: list[Path], coding: _MaskCoding, transform) -> None:
        self.images, self.masks, self.coding, self.transform = images, masks, coding, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor | None, Tensor | None, str]:
        image_path, mask_path = self.images[index], self.masks[index]
        try:
            image = open_rgb(image_path)
        except UNREADABLE_ERRORS as error:
            return None, None, f"{image_path}: {error}"
        try:
            with Image.open(mask_path) as file:
                file.load()
                mode, values = file.mode, np.array(file)
        except UNREADABLE_ERRORS as error:
            return None, None, f"{mask_path}: {error}"
        if mode not in ("L", "P"):
            raise UserError(f"mask {str(mask_path)!r} has image mode {mode}; save masks as single-channel "
                            "PNGs (mode L or P) whose pixel values are class indices")
        if image.size != (values.shape[1], values.shape[0]):
            raise UserError(
                f"mask {str(mask_path)!r} is {values.shape[1]}x{values.shape[0]} but its image "
                f"{str(image_path)!r} is {image.size[0]}x{image.size[1]} (width x height); a mask must have "
                "its image's size"
            )
        counts = np.bincount(values.ravel(), minlength=256)
        bad = np.flatnonzero((counts > 0) & ~self.coding.allowed)
        if bad.size:
            raise UserError(f"mask {str(mask_path)!r} has value(s) {bad.tolist()} {self.coding.rule}")
        image, mask = self.transform(image, Image.fromarray(self.coding.lookup[values]))
        return image, mask, ""


def collate_segmentation(samples: list[tuple]) -> tuple[Tensor | None, MaskBatch | None, list[str]]:
    """Batch the readable samples: images zero-padded (bottom/right) to a common size that is a multiple
    of 32, masks padded with IGNORE_INDEX to the largest mask; and the problems of the unreadable ones."""
    readable = [(image, mask) for image, mask, _ in samples if image is not None]
    problems = [problem for image, _, problem in samples if image is None]
    if not readable:
        return None, None, problems
    height = -(-max(image.shape[1] for image, _ in readable) // PAD_MULTIPLE) * PAD_MULTIPLE  # round up
    width = -(-max(image.shape[2] for image, _ in readable) // PAD_MULTIPLE) * PAD_MULTIPLE
    mask_h = max(mask.shape[0] for _, mask in readable)
    mask_w = max(mask.shape[1] for _, mask in readable)
    images = readable[0][0].new_zeros(len(readable), 3, height, width)
    masks = torch.full((len(readable), mask_h, mask_w), IGNORE_INDEX, dtype=torch.int64)
    for i, (image, mask) in enumerate(readable):
        images[i, :, : image.shape[1], : image.shape[2]] = image
        masks[i, : mask.shape[0], : mask.shape[1]] = mask
    image_sizes = [(int(image.shape[1]), int(image.shape[2])) for image, _ in readable]
    mask_sizes = [(int(mask.shape[0]), int(mask.shape[1])) for _, mask in readable]
    return images, MaskBatch(masks, image_sizes, mask_sizes), problems


def _pair_files(image_dir: Path, mask_dir: Path, layout_help: str) -> tuple[list[Path], list[Path]]:
    """Images and their masks (same stem, .png), checked one-to-one."""
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise UserError(f"segmentation data folder {str(folder)!r} does not exist (expected {layout_help})")
    images: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            if path.stem in images:
                raise UserError(f"images {str(images[path.stem])!r} and {str(path)!r} share a name, so one mask "
                                "cannot tell which it belongs to; rename or remove one")
            images[path.stem] = path
    masks = {path.stem: path for path in sorted(mask_dir.glob("*.png"))}
    if not images:
        raise UserError(f"{str(image_dir)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    lacking = [stem for stem in images if stem not in masks]
    if lacking:
        raise UserError(f"image {str(images[lacking[0]])!r} has no mask: expected {mask_dir / lacking[0]}.png"
                        + (f" ({len(lacking) - 1} more images lack masks)" if len(lacking) > 1 else ""))
    orphans = [stem for stem in masks if stem not in images]
    if orphans:
        raise UserError(f"mask {str(masks[orphans[0]])!r} has no image: expected {image_dir / orphans[0]}"
                        f".<{'|'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}>"
                        + (f" ({len(orphans) - 1} more masks lack images)" if len(orphans) > 1 else ""))
    return list(images.values()), [masks[stem] for stem in images]


def _read_classes(root: Path) -> list[str]:
    path = root / "classes.txt"
    if not path.is_file():
        raise UserError(f"segmentation folder {str(root)!r} has no classes.txt (one class name per line, "
                        f"line k naming the class of mask value k-1); expected {FOLDER_HELP}")
    lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM (Windows editors) is no part of a name
    if not lines:
        raise UserError(f"{str(path)!r} is empty: list the class names, one per line")
    blank = [number for number, line in enumerate(lines, 1) if not line.strip()]
    if blank:
        raise UserError(f"{str(path)!r} has blank line(s) {blank}: every line names one class (mask value = "
                        "line number - 1), so remove them or name the classes")
    if len(lines) > IGNORE_INDEX:
        raise UserError(f"{str(path)!r} lists {len(lines)} classes; at most {IGNORE_INDEX} fit, as mask value "
                        f"{IGNORE_INDEX} means ignore")
    names = [line.strip() for line in lines]
    first_line: dict[str, int] = {}
    for number, name in enumerate(names, 1):
        if name in first_line:
            raise UserError(f"{str(path)!r} names class {name!r} twice (lines {first_line[name]} and {number}); "
                            "each mask value needs a class of its own name")
        first_line[name] = number
    return names


def _find_layout(data: str) -> tuple[str, Path]:
    """("ade20k" | "folder", root) for a data folder, or UserError saying what was expected."""
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"--data {data!r} is neither 'digit-scenes' nor an existing folder")
    if (root / "ADEChallengeData2016").is_dir():
        return "ade20k", root / "ADEChallengeData2016"
    if any((root / "annotations").glob("instances_*.json")):
        raise UserError(f"--data {data!r} is a COCO folder (annotations/instances_*.json), a detection data set: "
                        "train a detection model on it; a segmentation model needs masks")
    if root.name == "ADEChallengeData2016" or (root / "annotations").is_dir():
        return "ade20k", root
    if any((root / name).exists() for name in ("masks", "classes.txt")):
        return "folder", root
    raise UserError(f"segmentation data folder {data!r} has neither the generic layout ({FOLDER_HELP}) nor "
                    f"the ADE20K one ({ADE20K_HELP})")


def build_segmentation_datasets(data: str, img_size: int, *, eval_only: bool = False,
                                normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
                                ) -> SegmentationSplits:
    """Train/val segmentation data sets for `data` = "digit-scenes", a generic folder or ADE20K; normalization:
    (mean, std) of the model's inputs (None: the data set's own, 0.5 for the digit scenes, else ImageNet's).

    Folders are checked here (layout, classes, one mask per image); masks are checked against their
    images where they are decoded. With eval_only the training split is neither needed nor scanned.
    """
    if data == "digit-scenes":
        layout, root, flip = "digit-scenes", digit_scenes_folder(), False
        mean, std = DIGIT_SCENES_MEAN, DIGIT_SCENES_STD
    else:
        (layout, root), flip = _find_layout(data), True
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    mean, std = normalization or (mean, std)
    if layout == "ade20k":
        classes, coding, layout_help = list(ADE20K_CLASSES), _ade20k_coding(), ADE20K_HELP
        folders = {"train": ("images/training", "annotations/training"),
                   "val": ("images/validation", "annotations/validation")}
    else:
        classes = _read_classes(root)
        coding, layout_help = _folder_coding(len(classes)), FOLDER_HELP
        folders = {split: (f"images/{split}", f"masks/{split}") for split in ("train", "val")}
    transforms = {"train": TrainTransform(img_size, mean, std, flip), "val": ValTransform(img_size, mean, std)}
    splits = {}
    for split, (image_dir, mask_dir) in folders.items():
        skip = eval_only and split == "train"
        files = ([], []) if skip else _pair_files(root / image_dir, root / mask_dir, layout_help)
        splits[split] = SegmentationDataset(*files, coding, transforms[split])
    return SegmentationSplits(splits["train"], splits["val"], classes, tuple(mean), tuple(std), layout, flip,
                              img_size)

