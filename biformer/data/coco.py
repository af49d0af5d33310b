"""Object detection / instance segmentation data in COCO's format: COCO itself, or the digit scenes.

A split is an annotation file (COCO's instances JSON) and the folder of its images. `read_coco` checks the
file when it is opened (JSON syntax, top-level keys, image/category references, listed images present) and
gives a data set of (image, target) pairs in the detection models' convention (biformer.dense.detection):
images float (3, H, W) in [0, 1]; targets {"boxes": (N, 4) float x1, y1, x2, y2 pixels, "labels": (N,)
int64 1..K, "masks": (N, H, W) uint8 (with_masks), "image_id": int64 scalar}. COCO's category ids are
mapped to 1..K in sorted id order; `category_ids[k - 1]` is label k's COCO id (to write results back).

As COCO's own training code does, crowd annotations are left out of the training targets (evaluation reads
the annotation file itself, where COCOeval ignores detections matched to crowd regions), boxes are clipped
to the image and boxes empty after clipping dropped; both are counted (`DataProblems`), not errors. Images
without annotations are kept as negatives.

The digit scenes get COCO annotations derived from their semantic masks (`biformer.data.scenes.digit_scenes_coco`): a scene's digits have distinct classes and do not overlap, so the pixels of one
class in a scene's mask are exactly one digit's instance mask. Deriving them from the cached masks leaves
the scene generator and its cached bytes untouched.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import UserError
from ..files import read_json
from .images import UNREADABLE_ERRORS, open_rgb
from .scenes import digit_scenes_coco

COCO_HELP = "annotations/instances_<split>.json beside the image folder <split>/ (e.g. instances_val2017.json and val2017/)"


@dataclass
class DataProblems:
    """What was repaired or left out while reading annotations (counted, not errors)."""

    clipped: int = 0  # boxes partly outside their image, clipped to it
    degenerate: int = 0  # boxes of zero or negative width or height (after clipping), dropped
    crowd: int = 0  # crowd annotations: not training targets; in evaluation, COCOeval ignores what matches them
    negatives: int = 0  # images without any (non-crowd) object, kept
    examples: list[str] = field(default_factory=list)  # the first few repaired/dropped entries, for the message

    def note(self, text: str) -> None:
        if len(self.examples) < 3:
            self.examples.append(text)

    def summary(self, name: str) -> str:
        """One line for the log: e.g. "val: 2 boxes clipped to their image, 1 degenerate ..." (name: the split)."""
        crowd = ("left out of the training targets" if name == "train"
                 else "kept as COCOeval's ignore regions (a detection matched to one neither scores nor counts)")
        parts = [f"{self.clipped} boxes clipped to their image" if self.clipped else "",
                 f"{self.degenerate} degenerate boxes dropped" if self.degenerate else "",
                 f"{self.crowd} crowd annotations {crowd}" if self.crowd else "",
                 f"{self.negatives} images without objects kept" if self.negatives else ""]
        text = "; ".join(part for part in parts if part) or "no problems"
        return f"{name}: {text}" + (f" (e.g. {'; '.join(self.examples)})" if self.examples else "")


@dataclass(frozen=True)
class _Object:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2, clipped
    label: int  # 1..K
    segmentation: Any  # COCO polygons (list of lists) or RLE (dict), or None without masks
    annotation_id: Any  # for messages


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _polygon_problem(segmentation: list) -> str | None:
    """What is wrong with COCO polygons [[x1, y1, x2, y2, ...], ...] (None: nothing): pycocotools needs at
    least three points per polygon (it reads four numbers as a box) and an x for every y."""
    for number, polygon in enumerate(segmentation, 1):
        if not isinstance(polygon, list) or not all(_number(value) for value in polygon):
            return f"polygon {number} is not a list of numbers"
        if len(polygon) < 6 or len(polygon) % 2:
            return (f"polygon {number} has {len(polygon)} coordinates; a polygon needs an even number of at least "
                    "6 (x, y of three points or more)")
    return None


class UnreadableImage(UserError):
    """An image file that exists but cannot be decoded (training skips it, as for classification)."""


class CocoDataset(Dataset):
    """(image, target) pairs of one COCO split; see the module docstring for the conventions.

    flip: horizontal flip with probability 0.5 (boxes and masks flipped too; python's global generator).
    Leave it off for the digit scenes: a mirrored digit is another symbol.
    with_masks: decode instance masks into the targets (Mask R-CNN); every non-crowd annotation then needs
    a "segmentation".
    ground_truth: the split is COCOeval's ground truth (validation), so every annotation needs its "area".
    """

    def __init__(self, annotation_file: str | Path, image_folder: str | Path, *, flip: bool = False,
                 with_masks: bool = True, ground_truth: bool = False) -> None:
        self.annotation_file, self.image_folder = Path(annotation_file), Path(image_folder)
        self.flip, self.with_masks = flip, with_masks
        self.problems = DataProblems()
        data = read_json(self.annotation_file, "annotation file", COCO_HELP)
        name = str(self.annotation_file)
        if not isinstance(data, dict):
            raise UserError(f"annotation file {name!r} holds a JSON {type(data).__name__}, not an object with "
                            "'images', 'annotations' and 'categories' (COCO's instances format)")
        missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
        if missing:
            raise UserError(f"annotation file {name!r} lacks the top-level list(s) {missing} of COCO's instances "
                            "format ('images', 'annotations', 'categories')")
        if not self.image_folder.is_dir():
            raise UserError(f"image folder {str(self.image_folder)!r} of {name!r} does not exist")
        label_of = self._read_categories(data["categories"], name)
        index_of = self._read_images(data["images"], name)
        self._read_annotations(data["annotations"], name, label_of, index_of, ground_truth)
        self.problems.negatives = sum(not objects for objects in self.objects)

    def _read_categories(self, entries: list, name: str) -> dict[int, int]:
        """Set .category_ids and .classes; COCO category id -> label 1..K."""
        categories: dict[int, str] = {}
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or "name" not in entry:
                raise UserError(f"annotation file {name!r}: category {entry!r} needs an integer 'id' and a 'name'")
            if entry["id"] in categories:
                raise UserError(f"annotation file {name!r}: category id {entry['id']} is listed twice")
            categories[entry["id"]] = str(entry["name"])
        if not categories:
            raise UserError(f"annotation file {name!r} lists no categories")
        self.category_ids = sorted(categories)  # label k <-> COCO id category_ids[k - 1]
        self.classes = [categories[i] for i in self.category_ids]
        return {category: k for k, category in enumerate(self.category_ids, 1)}

    def _read_images(self, entries: list, name: str) -> dict[int, int]:
        """Set .images (each image's id, file name and size, files checked to exist); image id -> index."""
        self.images: list[dict[str, Any]] = []
        index_of: dict[int, int] = {}
        for entry in entries:
            ok = isinstance(entry, dict) and isinstance(entry.get("id"), int)
            if not ok or not isinstance(entry.get("file_name"), str) or not all(
                    isinstance(entry.get(key), int) and entry[key] > 0 for key in ("width", "height")):
                raise UserError(f"annotation file {name!r}: image {entry.get('id') if ok else entry!r} needs an "
                                "integer 'id', a 'file_name' and positive integer 'width' and 'height'")
            if entry["id"] in index_of:
                raise UserError(f"annotation file {name!r}: image id {entry['id']} is listed twice")
            if not (self.image_folder / entry["file_name"]).is_file():
                raise UserError(f"annotation file {name!r}: image id {entry['id']}'s file "
                                f"{str(self.image_folder / entry['file_name'])!r} does not exist")
            index_of[entry["id"]] = len(self.images)
            self.images.append({key: entry[key] for key in ("id", "file_name", "width", "height")})

        if not self.images:
            raise UserError(f"annotation file {name!r} lists no images: its split is empty")
        return index_of

    def _read_annotations(self, entries: list, name: str, label_of: dict[int, int], index_of: dict[int, int],
                          ground_truth: bool) -> None:
        """Set .objects (per image, its non-crowd objects with clipped boxes), counting what was repaired or left
        out in .problems; UserError for an annotation that is malformed."""
        with_masks = self.with_masks
        self.objects: list[list[_Object]] = [[] for _ in self.images]
        annotation_ids: set[int] = set()
        for number, entry in enumerate(entries, 1):
            if not isinstance(entry, dict):
                raise UserError(f"annotation file {name!r}: annotation {entry!r} is not an object")
            if not isinstance(entry.get("id"), int) or isinstance(entry.get("id"), bool):
                raise UserError(f"annotation file {name!r}: annotation {number} (of 'annotations') has no integer 'id'")
            if entry["id"] in annotation_ids:
                raise UserError(f"annotation file {name!r}: annotation id {entry['id']} is listed twice")
            annotation_ids.add(entry["id"])
            where = f"annotation file {name!r}: annotation id {entry.get('id')!r}"
            if ground_truth and not _number(entry.get("area")):
                raise UserError(f"{where} has no numeric 'area', which COCO's evaluation needs (the object's "
                                "pixel area, e.g. its mask's)")
            if entry.get("image_id") not in index_of:
                raise UserError(f"{where} refers to image id {entry.get('image_id')!r}, which 'images' does not list")
            if entry.get("category_id") not in label_of:
                raise UserError(f"{where} has category id {entry.get('category_id')!r}, which 'categories' does not "
                                f"list (ids {self.category_ids})")
            bbox = entry.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
                raise UserError(f"{where} needs a 'bbox' of 4 numbers [x, y, width, height], not {bbox!r}")
            if entry.get("iscrowd", 0):
                self.problems.crowd += 1
                continue
            segmentation = entry.get("segmentation")
            if with_masks and not (isinstance(segmentation, list) and segmentation or isinstance(segmentation, dict)):
                raise UserError(f"{where} has no 'segmentation' (polygons or RLE), which instance masks need")
            problem = _polygon_problem(segmentation) if with_masks and isinstance(segmentation, list) else None
            if problem:
                raise UserError(f"{where} has a malformed 'segmentation': {problem}")
            image = self.images[index_of[entry["image_id"]]]
            x, y, w, h = (float(v) for v in bbox)
            box = (min(max(x, 0.0), image["width"]), min(max(y, 0.0), image["height"]),
                   min(max(x + w, 0.0), image["width"]), min(max(y + h, 0.0), image["height"]))
            if box[2] <= box[0] or box[3] <= box[1]:
                self.problems.degenerate += 1
                self.problems.note(f"annotation id {entry.get('id')!r} dropped (box {bbox})")
                continue
            if box != (x, y, x + w, y + h):
                self.problems.clipped += 1
                self.problems.note(f"annotation id {entry.get('id')!r} clipped")
            self.objects[index_of[entry["image_id"]]].append(
                _Object(box, label_of[entry["category_id"]], segmentation if with_masks else None, entry.get("id")))

    @property
    def image_ids(self) -> list[int]:
        return [image["id"] for image in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def _mask(self, segmentation: Any, height: int, width: int, annotation: str) -> np.ndarray:
        try:
            if isinstance(segmentation, list):  # polygons
                rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
            elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(segmentation, height, width)
            else:
                rle = dict(segmentation)
                if isinstance(rle["counts"], str):
                    rle["counts"] = rle["counts"].encode("ascii")
            with warnings.catch_warnings():  # pycocotools' Cython decoder under numpy 2 (harmless)
                warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
                decoded = mask_utils.decode(rle)
        except (TypeError, ValueError, KeyError, IndexError) as error:
            raise UserError(f"annotation file {str(self.annotation_file)!r}: {annotation} has a malformed "
                            f"'segmentation': {error}") from error
        if decoded.shape[:2] != (height, width):
            raise UserError(f"annotation file {str(self.annotation_file)!r}: {annotation}'s RLE is "
                            f"{decoded.shape[1]}x{decoded.shape[0]} but its image is {width}x{height}")
        return decoded

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        info, objects = self.images[index], self.objects[index]
        path = self.image_folder / info["file_name"]
        try:
            image = np.asarray(open_rgb(path))
        except UNREADABLE_ERRORS as error:
            raise UnreadableImage(f"image id {info['id']}'s file {str(path)!r} cannot be read: {error}") from error
        height, width = image.shape[:2]
        if (width, height) != (info["width"], info["height"]):
            raise UserError(f"image id {info['id']}'s file {str(path)!r} is {width}x{height} but "
                            f"{str(self.annotation_file)!r} says {info['width']}x{info['height']}")
        tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div_(255)
        target = {
            "boxes": torch.tensor([obj.box for obj in objects], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([obj.label for obj in objects], dtype=torch.int64),
            "image_id": torch.tensor(info["id"], dtype=torch.int64),
        }
        if self.with_masks:
            masks = [self._mask(obj.segmentation, height, width, f"annotation id {obj.annotation_id!r}")
                     for obj in objects]
            target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                               else torch.zeros((0, height, width), dtype=torch.uint8))
        if self.flip and random.random() < 0.5:
            tensor = tensor.flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
            target["boxes"] = boxes
            if self.with_masks:
                target["masks"] = target["masks"].flip(-1)
        return tensor, target


def read_coco(annotation_file: str | Path, image_folder: str | Path, *, flip: bool = False,
              with_masks: bool = True, ground_truth: bool = False) -> CocoDataset:
    """The COCO split of `annotation_file` (instances JSON) whose images lie in `image_folder`."""
    return CocoDataset(annotation_file, image_folder, flip=flip, with_masks=with_masks, ground_truth=ground_truth)


def find_coco_split(root: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of `split` in COCO's layout: root/annotations/instances_<split>*.json
    beside root/<split>*/ (e.g. "val" -> instances_val2017.json and val2017/)."""
    root = Path(root)
    folder = root / "annotations"
    if not folder.is_dir():
        raise UserError(f"COCO folder {str(root)!r} has no annotations/ folder (expected {COCO_HELP})")
    exact = folder / f"instances_{split}.json"
    found = [exact] if exact.is_file() else sorted(folder.glob(f"instances_{split}*.json"))
    if not found:
        raise UserError(f"{str(folder)!r} holds no instances_{split}*.json (expected {COCO_HELP})")
    if len(found) > 1:
        raise UserError(f"{str(folder)!r} holds several files for split {split!r} "
                        f"({', '.join(path.name for path in found)}); name the split exactly")
    name = found[0].stem.removeprefix("instances_")
    for images in (root / name, root / "images" / name):
        if images.is_dir():
            return found[0], images
    raise UserError(f"the images of {str(found[0])!r} should be in {str(root / name)!r}, which does not exist")


class TensorList(list):
    """A batch's images or targets as a list (the detection models take images of different sizes) that moves
    its tensors, also those inside dicts, with `.to(device)` as a batched tensor would."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TensorList:
        def move(item: Any) -> Any:
            if isinstance(item, dict):
                return {key: move(value) for key, value in item.items()}
            return item.to(device, non_blocking=non_blocking)

        return TensorList(move(item) for item in self)


class ReadableSamples(Dataset):
    """(image, target, None) of a `CocoDataset`, or (None, None, problem) for an image that cannot be decoded:
    the training engine's sample convention, which skips unreadable images and reports each once."""

    def __init__(self, dataset: CocoDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor | None, dict[str, Tensor] | None, str | None]:
        try:
            image, target = self.dataset[index]
        except UnreadableImage as error:
            return None, None, str(error)
        return image, target, None


def collate_detection(samples: list[tuple]) -> tuple[TensorList | None, TensorList | None, list[str]]:
    """(images, targets, problems) of `ReadableSamples` items: the readable images and their targets as
    `TensorList`s (None if there is none), and the problems of the unreadable ones."""
    readable = [(image, target) for image, target, _ in samples if image is not None]
    problems = [problem for image, _, problem in samples if image is None]
    if not readable:
        return None, None, problems
    return TensorList(image for image, _ in readable), TensorList(target for _, target in readable), problems


@dataclass
class DetectionSplits:
    """A detection data set's splits. The images go to the model in [0, 1]: it normalizes them itself, so
    the data's mean and std are the identity. `val_annotations` is the validation split's instances file
    (COCOeval's ground truth); `category_ids[k - 1]` is label k's COCO category id."""

    train: Dataset
    val: Dataset
    classes: list[str]
    category_ids: list[int]
    val_annotations: Path
    problems: dict[str, DataProblems]  # per split, what reading the annotations repaired or left out
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)


def build_detection_datasets(data: str, *, with_masks: bool, eval_only: bool = False) -> DetectionSplits:
    """Train/val detection data sets of `data` = "digit-scenes" or a folder in COCO's layout (train/val splits,
    e.g. instances_train2017.json with train2017/). Training flips horizontally, except for the digit scenes
    (a mirrored digit is another symbol). With eval_only the training split is neither needed nor read."""
    if data == "digit-scenes":
        files = {split: (paths.annotations, paths.images) for split, paths in digit_scenes_coco().items()}
        flip = False
    else:
        if not Path(data).is_dir():
            raise UserError(f"--data {data!r}: detection models train on 'digit-scenes' or a folder in COCO's "
                            f"layout ({COCO_HELP})")
        files = {split: find_coco_split(data, split) for split in (("val",) if eval_only else ("train", "val"))}
        flip = True
    val = CocoDataset(*files["val"], with_masks=with_masks, ground_truth=True)
    train = val if eval_only else CocoDataset(*files["train"], flip=flip, with_masks=with_masks)
    if train.category_ids != val.category_ids or train.classes != val.classes:
        raise UserError(f"{str(files['train'][0])!r} and {str(files['val'][0])!r} list different categories")
    problems = {"val": val.problems} if eval_only else {"train": train.problems, "val": val.problems}
    return DetectionSplits(ReadableSamples(train), ReadableSamples(val), val.classes, val.category_ids,
                           val.annotation_file, problems)
