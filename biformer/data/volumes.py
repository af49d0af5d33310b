"""Volumes for 3-D segmentation, in the Medical Segmentation Decathlon's layout, read and transformed with MONAI
(`pip install 'biformer[medical]'`: monai, nibabel); and the embedded synthetic volumes.

Layout: DATA/dataset.json (its "labels" {"0": "background", ...}, "modality" {"0": "CT" | "MRI" | ...},
"training" [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...], "test" ["./imagesTs/y.nii.gz"],
and optionally "validation" like "training"), DATA/imagesTr, labelsTr, imagesTs. Images are 3-D (one modality) or
4-D (x, y, z, modality); labels 3-D class indices. Without a "validation" list every fifth training case (by name)
validates.

Shape legend: C modalities, D/H/W voxels (MONAI's channel-first arrays after reorientation to RAS).
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import UserError
from .cache import cached_folder

SYNTHETIC_VOLUMES = "synthetic-volumes"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IGNORE_LABEL = 255  # padding of a batch's labels: not counted by the loss or the metrics
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # the axis names RAS is spelled in (MONAI's default, given)
VALIDATION_EVERY = 5  # without a "validation" list, every fifth training case (by name) validates


def medical():
    """(monai, nibabel); UserError naming the extra to install without them."""
    try:
        import monai
        import nibabel
    except ImportError as error:
        raise UserError("volumes need MONAI and nibabel: pip install 'biformer[medical]'") from error
    return monai, nibabel


def is_nifti(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(NIFTI_SUFFIXES)


@dataclass(frozen=True)
class Case:
    image: Path
    label: Path | None


@dataclass(frozen=True)
class Decathlon:
    """A data set in the Decathlon layout, as its dataset.json describes it."""

    root: Path
    classes: list[str]  # by label value: classes[0] is the background
    modalities: list[str]
    training: list[Case]
    validation: list[Case]
    test: list[Path]


def _case(root: Path, entry: Any, where: str) -> Case:
    if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
        raise UserError(f"{root / 'dataset.json'}: each {where} entry needs an image and a label, got {entry!r}")
    return Case(root / entry["image"], root / entry["label"])


def read_decathlon(data: str) -> Decathlon:
    """The data set at folder `data`; UserError for a missing or malformed dataset.json, labels that are not 0..K-1,
    or files it names that do not exist."""
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"--data {data!r} is neither {SYNTHETIC_VOLUMES!r} nor an existing folder")
    path = root / "dataset.json"
    if not path.is_file():
        raise UserError(f"--data {data!r} has no dataset.json (the Decathlon layout: dataset.json beside imagesTr/ "
                        "and labelsTr/)")
    try:
        described = json.loads(path.read_text())
        labels = {int(value): str(name) for value, name in described["labels"].items()}
        modalities = [str(name) for _, name in sorted(described["modality"].items(), key=lambda item: int(item[0]))]
        training = sorted((_case(root, entry, "training") for entry in described["training"]), key=lambda c: c.image.name)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{path}: not a Decathlon dataset.json (labels, modality and training): {error}") from error
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise UserError(f"{path}: labels must be 0..K-1 with K >= 2 (0 the background), got {sorted(labels)}")
    if "validation" in described:
        validation = [_case(root, entry, "validation") for entry in described["validation"]]
    else:
        validation, training = training[::VALIDATION_EVERY], [c for i, c in enumerate(training) if i % VALIDATION_EVERY]
    test = [root / entry for entry in described.get("test", [])]
    missing = [p for c in training + validation for p in (c.image, c.label) if not p.is_file()] + \
        [p for p in test if not p.is_file()]
    if missing:
        raise UserError(f"{path} names {len(missing)} file(s) that do not exist, e.g. {missing[0]}")
    return Decathlon(root, [labels[value] for value in range(len(labels))], modalities, training, validation, test)


@dataclass(frozen=True)
class VolumeInfo:
    shape: tuple[int, int, int]  # voxels per axis, in RAS order
    channels: int
    spacing: tuple[float, float, float]  # mm per axis, in RAS order


def volume_info(path: Path, modalities: int | None = None) -> VolumeInfo:
    """A NIfTI file's voxel grid from its header; UserError for a file that cannot be read, is not a volume, or
    holds another number of modalities than `modalities`."""
    _, nibabel = medical()
    try:
        volume = nibabel.load(os.fspath(path))
    except Exception as error:  # nibabel raises many kinds for a damaged file
        raise UserError(f"{path} cannot be read as NIfTI: {error}") from error
    header = volume.header
    shape = tuple(int(size) for size in header.get_data_shape())
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise UserError(f"{path} is {'x'.join(map(str, shape))} voxels: 3-D models take volumes (x, y, z[, modality])")
    channels = shape[3] if len(shape) == 4 else 1
    if len(shape) > 4 or (modalities is not None and channels != modalities):
        raise UserError(f"{path} has {channels} modalities (shape {shape}), dataset.json names {modalities}")
    # the file's axes in RAS order (as MONAI's Orientationd leaves them), so that spacings and sizes compare with
    # --spacing's, whatever order the file stores its axes in
    order = [int(axis) for axis in np.argsort(nibabel.io_orientation(volume.affine)[:, 0])]
    zooms = header.get_zooms()[:3]
    return VolumeInfo(tuple(shape[axis] for axis in order), channels, tuple(float(zooms[axis]) for axis in order))


def check_cases(dataset: Decathlon, cases: Sequence[Case]) -> list[VolumeInfo]:
    """Every case read before a run starts: headers (a 3-D image and a label of the same grid) and the label
    values (within dataset.json's labels); UserError naming the first case that does not fit."""
    _, nibabel = medical()
    infos = []
    for case in cases:
        info = volume_info(case.image, len(dataset.modalities))
        label = volume_info(case.label, 1)
        if label.shape != info.shape:
            raise UserError(f"label {case.label} is {label.shape} voxels but its image {case.image} is {info.shape}")
        values = np.unique(np.asarray(nibabel.load(os.fspath(case.label)).dataobj))
        beyond = [value.item() for value in values if not (float(value).is_integer() and 0 <= value < len(dataset.classes))]
        if beyond:
            raise UserError(f"label {case.label} holds value(s) {beyond[:5]} beyond dataset.json's labels "
                            f"0..{len(dataset.classes) - 1}")
        infos.append(info)
    return infos


def median_spacing(infos: Sequence[VolumeInfo]) -> tuple[float, float, float]:
    """The training volumes' median voxel spacing per axis (nnU-Net's target spacing rule)."""
    return tuple(float(np.median([info.spacing[axis] for info in infos])) for axis in range(3))


def volume_transforms(modalities: list[str], spacing: Sequence[float], crop: int | None, foreground: float,
                      with_label: bool = True):
    """MONAI's transforms: load, channels first, RAS orientation, resampling to `spacing` (labels by nearest),
    intensities (CT: the volume's 0.5-99.5 percentiles to 0..1; other modalities: zero mean, unit variance over
    their non-zero voxels, per channel); with `crop`, training's: pad to at least crop^3, a random crop^3 centred
    on a foreground voxel with probability `foreground`, a flip per axis half the time."""
    medical()
    from monai import transforms as T

    keys = ["image", "label"] if with_label else ["image"]
    steps = [T.LoadImaged(keys, image_only=True), T.EnsureChannelFirstd(keys), T.Orientationd(keys, axcodes="RAS", labels=RAS_LABELS),
             T.Spacingd(keys, pixdim=tuple(spacing), mode=("bilinear", "nearest")[: len(keys)])]
    if all(modality.upper() == "CT" for modality in modalities):
        steps.append(T.ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True, channel_wise=True))
    else:
        steps.append(T.NormalizeIntensityd("image", nonzero=True, channel_wise=True))
    if crop is not None:
        steps += [T.SpatialPadd(keys, spatial_size=crop),
                  T.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=crop, pos=foreground,
                                           neg=1 - foreground, num_samples=1, allow_smaller=False),
                  *(T.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3))]
    return T.Compose(steps)


class VolumeDataset(Dataset):
    """(image (C, D, H, W), label (D, H, W) int64, "") per case, transformed; training crops one patch per case
    per visit."""

    def __init__(self, cases: list[Case], transform: Any) -> None:
        self.cases, self.transform = cases, transform

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, str]:
        case = self.cases[index]
        sample = self.transform({"image": os.fspath(case.image), "label": os.fspath(case.label)})
        if isinstance(sample, list):  # a random crop gives a list of num_samples crops
            sample = sample[0]
        return plain(sample["image"]).float(), plain(sample["label"])[0].long(), ""


def plain(array: Any) -> Tensor:
    """A MONAI MetaTensor (or array) as a plain tensor, its metadata left behind."""
    return array.as_tensor() if hasattr(array, "as_tensor") else torch.as_tensor(array)


@dataclass
class VolumeBatch:
    """A batch's labels (padded with IGNORE_LABEL to the largest), and each volume's own size."""

    labels: Tensor
    sizes: list[tuple[int, int, int]]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> VolumeBatch:
        return VolumeBatch(self.labels.to(device, non_blocking=non_blocking), self.sizes)

    def __len__(self) -> int:
        return len(self.labels)


def collate_volumes(samples: list[tuple]) -> tuple[Tensor, VolumeBatch, list[str]]:
    """Volumes zero-padded (at the end of each axis) to the batch's largest, labels with IGNORE_LABEL."""
    size = [max(image.shape[1 + axis] for image, _, _ in samples) for axis in range(3)]
    images = samples[0][0].new_zeros(len(samples), samples[0][0].shape[0], *size)
    labels = torch.full((len(samples), *size), IGNORE_LABEL, dtype=torch.int64)
    for index, (image, label, _) in enumerate(samples):
        depth, height, width = image.shape[1:]
        images[index, :, :depth, :height, :width] = image
        labels[index, :depth, :height, :width] = label
    return images, VolumeBatch(labels, [tuple(image.shape[1:]) for image, _, _ in samples]), []


@dataclass
class VolumeSplits:
    train: VolumeDataset
    val: VolumeDataset
    classes: list[str]
    modalities: list[str]
    spacing: tuple[float, float, float]
    crop: int
    mean: tuple[float, ...]  # (0, ...) and (1, ...) per modality: each volume is normalized on its own
    std: tuple[float, ...]  # (see volume_transforms)


def build_volume_datasets(data: str, crop: int, *, eval_only: bool = False,
                          spacing: Sequence[float] | None = None, foreground: float = 0.5) -> VolumeSplits:
    """Train/val splits of `data` = "synthetic-volumes" or a Decathlon folder, every case checked first
    (`check_cases`); spacing: the voxel spacing volumes are resampled to (None: the training volumes' median);
    crop: the training patch's side in voxels (a volume smaller along an axis is zero-padded to it, and a note
    counts such volumes)."""
    dataset = read_decathlon(os.fspath(synthetic_volumes_folder()) if data == SYNTHETIC_VOLUMES else data)
    train_cases = [] if eval_only else dataset.training
    infos = check_cases(dataset, train_cases + dataset.validation)
    if spacing is None:
        spacing = median_spacing(infos[: len(train_cases)] or infos)
    if not eval_only:
        smaller = [case for case, info in zip(train_cases, infos)
                   if min(math.floor(size * own / target) for size, own, target in zip(info.shape, info.spacing, spacing)) < crop]
        if smaller:
            print(f"note: {len(smaller)} of {len(train_cases)} training volumes are smaller than the {crop}-voxel crop "
                  f"along some axis at spacing {tuple(spacing)} (e.g. {smaller[0].image.name}): zero-padded to it",
                  file=sys.stderr, flush=True)
    train = VolumeDataset(train_cases, volume_transforms(dataset.modalities, spacing, crop, foreground))
    val = VolumeDataset(dataset.validation, volume_transforms(dataset.modalities, spacing, None, foreground))
    return VolumeSplits(train, val, dataset.classes, dataset.modalities, tuple(spacing), crop,
                        (0.0,) * len(dataset.modalities), (1.0,) * len(dataset.modalities))


# -- the embedded synthetic volumes -----------------------------------------------------------------------------

SYNTHETIC_FOLDER = "synthetic-volumes-v2"
SYNTHETIC_CLASSES = ["background", "ball", "box"]
SYNTHETIC_SHAPE, SYNTHETIC_SPACING = (64, 64, 48), (1.0, 1.0, 1.5)  # voxels and mm: the slices are thicker
SYNTHETIC_CASES = {"training": 24, "test": 2}


def _synthetic_case(generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) of one volume: two to four balls and boxes of random size and brightness in a smoothly
    shaded, noisy background; a ball and a box can be as bright, so their shape tells them apart."""
    shape = SYNTHETIC_SHAPE
    grid = np.stack(np.meshgrid(*(np.arange(size) * spacing for size, spacing in zip(shape, SYNTHETIC_SPACING)),
                                indexing="ij"), -1)  # (X, Y, Z, 3) positions in mm
    shading = grid @ generator.normal(0, 0.004, 3)
    image = 0.2 + shading + generator.normal(0, 0.06, shape)
    label = np.zeros(shape, np.uint8)
    extent = np.array(shape) * np.array(SYNTHETIC_SPACING)
    for _ in range(int(generator.integers(2, 5))):
        centre = generator.uniform(0.2, 0.8, 3) * extent
        radius = generator.uniform(6, 12)
        if generator.random() < 0.5:
            inside, kind = np.linalg.norm(grid - centre, axis=-1) <= radius, 1
        else:
            inside, kind = (np.abs(grid - centre) <= radius * generator.uniform(0.6, 1.0, 3)).all(-1), 2
        image[inside] = generator.uniform(0.6, 1.0) + generator.normal(0, 0.06, int(inside.sum()))
        label[inside] = kind
    return image.astype(np.float32), label


def _write_synthetic_volumes(folder: Path) -> None:
    _, nibabel = medical()
    generator = np.random.default_rng(0)
    affine = np.diag([*SYNTHETIC_SPACING, 1.0])
    for part in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / part).mkdir()
    training, test = [], []
    for index in range(SYNTHETIC_CASES["training"] + SYNTHETIC_CASES["test"]):
        image, label = _synthetic_case(generator)
        name = f"shapes_{index:03d}.nii.gz"
        if index < SYNTHETIC_CASES["training"]:
            nibabel.save(nibabel.Nifti1Image(image, affine), folder / "imagesTr" / name)
            nibabel.save(nibabel.Nifti1Image(label, affine), folder / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            nibabel.save(nibabel.Nifti1Image(image, affine), folder / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")
    described = {"name": "synthetic shapes", "description": "balls and boxes in noisy volumes (biformer)",
                 "labels": {str(value): name for value, name in enumerate(SYNTHETIC_CLASSES)},
                 "modality": {"0": "MRI"}, "training": training, "test": test}
    (folder / "dataset.json").write_text(json.dumps(described, indent=1))


def synthetic_volumes_folder() -> Path:
    """The synthetic volumes in the Decathlon layout: 24 training cases (every fifth validates) and 2 test cases of
    64x64x48 voxels at 1 x 1 x 1.5 mm, classes background, ball, box; generated once (seconds) into the cache."""
    return cached_folder(SYNTHETIC_FOLDER, _write_synthetic_volumes)
