"""Volumetric segmentation: `unet_biformer3d_<size>` and MONAI's networks by name (`biformer.dense.volumes`) on the
synthetic volumes or a Decathlon folder (MONAI's transforms, sliding-window inference, Dice and 95th-percentile
Hausdorff distance per class); `predict` writes NIfTI label volumes on the input's own grid (its affine and shape)
and a PNG of orthogonal slices.

Shape legend: B volumes, C modalities, K classes, D/H/W voxels (RAS order after MONAI's reorientation).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..config import TaskOptions, TrainConfig, option
from ..data.volumes import (
    IGNORE_LABEL,
    SYNTHETIC_VOLUMES,
    VolumeBatch,
    VolumeSplits,
    build_volume_datasets,
    collate_volumes,
    is_nifti,
    medical,
    plain,
    volume_info,
    volume_transforms,
)
from ..dense.volumes import (
    VOLUME_HEADS,
    VOLUME_MODEL_FORMS,
    check_volume_sides,
    create_volume_model,
    is_monai_volume_model,
    is_volume_model,
    monai_not_supported_reasons,
)
from ..data.images import list_inputs
from ..errors import UserError
from ..runtime import DistEnv, all_reduce_sum, autocast
from .base import Objective, Prediction, Restored, Task, UnreadableImages, UnreadableInput, eval_batches

MIN_CROP = 64
OVERLAP_HELP = "the overlap of neighbouring sliding windows (a fraction of the window; MONAI's sliding_window_inference)"


@dataclass(frozen=True)
class VolumeOptions(TaskOptions):
    overlap: float = option(0.5, OVERLAP_HELP, least=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.overlap >= 1:
            raise UserError(f"--overlap must be below 1 (windows that overlap wholly never move), got {self.overlap}")


def sliding_window(model: nn.Module, volumes: Tensor, window: int, overlap: float) -> Tensor:
    """Logits (B, K, D, H, W) of volumes (B, C, D, H, W) by windows of window^3 voxels (MONAI's, Gaussian-weighted
    where they overlap)."""
    from monai.inferers import sliding_window_inference

    return plain(sliding_window_inference(volumes, (window,) * 3, 2, model, overlap=overlap, mode="gaussian"))


class DiceCrossEntropy(nn.Module):
    """MONAI's Dice + cross-entropy loss (softmax, every class) on labels (B, D, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        from monai.losses import DiceCELoss

        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.loss(logits, labels[:, None])


class VolumeSegmentationTask(Task):
    """Training crops patches; validation slides a window of the training crop over each whole volume."""

    name = "volume-segmentation"
    heads = VOLUME_HEADS
    default_data = SYNTHETIC_VOLUMES
    reference_classes = 14  # BTCV's, SwinUNETR's reference data set
    train_options = frozenset({"spacing", "foreground"})
    EvalOptions = VolumeOptions
    PredictOptions = VolumeOptions
    predicts_files = True
    input_noun = "volume"
    metric = "val_dice"
    train_accuracy = "train_vacc"
    collate = staticmethod(collate_volumes)

    def __init__(self) -> None:
        self.in_channels = 1  # the modalities of the data a run trains on (`training_splits` reads them)

    @classmethod
    def claims(cls, model_name: str) -> bool:
        return is_volume_model(model_name)

    @classmethod
    def model_forms(cls) -> str:
        return VOLUME_MODEL_FORMS

    def check_config(self, config: TrainConfig) -> None:
        super().check_config(config)
        if config.img_size < MIN_CROP:
            raise UserError(f"--img-size {config.img_size}: a volume model's training crop needs at least {MIN_CROP} "
                            "voxels per side (our models' deepest map, at stride 32, must hold more than one voxel for "
                            "the decoder's instance norms)")
        if is_monai_volume_model(config.model):  # before the data are read
            reasons = monai_not_supported_reasons(config.model, config.drop_path or 0.0, config.pretrained is not None)
            if reasons:
                raise UserError("; ".join(reasons))
        check_volume_sides(config.model, (config.img_size,), "--img-size")
        if config.spacing is not None and min(config.spacing) <= 0:
            raise UserError(f"--spacing must be positive on every axis (mm), got {' '.join(map(str, config.spacing))}")
        if not 0 <= config.foreground <= 1:
            raise UserError(f"--foreground is a share of the crops: 0..1, got {config.foreground}")

    def build_datasets(self, data: str, img_size: int, *, auto_augment: str | None = None,
                       random_erasing: float = 0.0, eval_only: bool = False,
                       normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> VolumeSplits:
        return build_volume_datasets(data, img_size, eval_only=eval_only)

    def training_splits(self, config: TrainConfig, normalization: Any) -> VolumeSplits:
        splits = build_volume_datasets(config.data, config.img_size, spacing=config.spacing,
                                       foreground=config.foreground)
        self.in_channels = len(splits.modalities)
        return splits

    def evaluation_splits(self, data: str, restored: Restored, options: VolumeOptions, normalization: Any
                          ) -> VolumeSplits:
        return build_volume_datasets(data, restored.img_size, eval_only=True, spacing=restored.metadata["spacing"])

    def build_model(self, config: TrainConfig, classes: Sequence[str]) -> nn.Module:
        return create_volume_model(config.model, len(classes), self.in_channels, drop_path_rate=config.drop_path or 0.0,
                                   backbone_checkpoint=config.pretrained)

    def build_objective(self, config: TrainConfig, num_classes: int, model: nn.Module) -> Objective:
        return Objective(DiceCrossEntropy())

    def loss(self, outputs: Tensor, targets: VolumeBatch, objective: Objective) -> Tensor:
        return objective.criterion(outputs.float(), targets.labels)

    def hits(self, outputs: Tensor, targets: VolumeBatch) -> tuple[float, float]:
        counted = targets.labels != IGNORE_LABEL
        return ((outputs.argmax(1) == targets.labels) & counted).sum().item(), counted.sum().item()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, env: DistEnv, *, splits: VolumeSplits,
                 options: VolumeOptions | None = None, amp: str = "none", desc: str = "val",
                 unreadable: UnreadableImages | None = None) -> dict[str, Any]:
        """Cross-entropy per voxel; per foreground class the Dice (percent) and HD95 (mm at the resampled spacing)
        averaged over the volumes where the class is present (`class_scores`), and their means over the classes.
        Each volume is slid over on its own, without the batch's padding."""
        overlap = (options or VolumeOptions()).overlap
        model.eval()
        classes = len(splits.classes)
        sums = [0.0, 0.0, 0.0] + [0.0] * (3 * (classes - 1))  # loss, voxels, volumes; per class: dice, hd, volumes
        for volumes, targets in eval_batches(loader, env, desc, unreadable):
            for sample, size in enumerate(targets.sizes):
                region = (slice(sample, sample + 1), slice(None), *(slice(0, extent) for extent in size))
                with autocast(env.device, amp):
                    scores = sliding_window(model, volumes[region], splits.crop, overlap).float()
                labels = targets.labels[region[:1] + region[2:]]
                sums[0] += F.cross_entropy(scores, labels, reduction="sum").item()
                sums[1], sums[2] = sums[1] + labels.numel(), sums[2] + 1
                for index, (dice, distance) in enumerate(class_scores(scores.argmax(1)[0], labels[0], classes,
                                                                      splits.spacing)):
                    if dice is not None:
                        sums[3 + 3 * index: 6 + 3 * index] = [sums[3 + 3 * index] + dice,
                                                              sums[4 + 3 * index] + distance, sums[5 + 3 * index] + 1]
        totals = all_reduce_sum(sums, env)
        if totals[2] == 0:
            raise UserError("no validation volume could be read")
        per_class = [totals[3 + 3 * i: 6 + 3 * i] for i in range(classes - 1)]
        class_dice = [100 * dice / count if count else None for dice, _, count in per_class]
        class_hd = [distance / count if count else None for _, distance, count in per_class]
        return {"loss": totals[0] / totals[1], "dice": _mean(class_dice), "hd95_mm": _mean(class_hd),
                "class_dice": class_dice, "class_hd95_mm": class_hd, "count": int(totals[2])}

    def metric_columns(self) -> tuple[str, ...]:
        return ("dice", "hd95_mm", "class_dice")

    def metadata(self, splits: VolumeSplits) -> dict[str, Any]:
        return {"spacing": list(splits.spacing), "modalities": splits.modalities, "in_channels": len(splits.modalities)}

    def summary(self, row: dict[str, Any], best: dict[str, Any], classes: list[str]) -> str:
        return (f"final validation Dice: {row['val_dice']:.2f}% (best {best['val_dice']:.2f}% at {best['at']}), "
                f"HD95 {row['val_hd95_mm']:.2f} mm\n" + _class_table(classes, row["val_class_dice"]))

    def reference_size(self, model_name: str) -> int:
        return 96  # SwinUNETR's crop

    def input_size(self, model: nn.Module, model_name: str, size: tuple[int, int], frames: int | None
                   ) -> tuple[int, tuple[int, ...]]:
        return model.in_channels, (size[0], *size)

    def restore(self, checkpoint: str | os.PathLike, metadata: dict[str, Any], model_name: str,
                img_size: int | None = None) -> Restored:
        if img_size is not None:  # eval's and predict's --img-size: the sliding window's side
            check_volume_sides(model_name, (img_size,), "--img-size")
        return super().restore(checkpoint, metadata, model_name, img_size)

    def restored_model(self, model_name: str, metadata: dict[str, Any], img_size: int) -> nn.Module:
        return create_volume_model(model_name, len(metadata["classes"]), metadata.get("in_channels", 1))

    def report(self, result: dict[str, Any], restored: Restored, checkpoint: str) -> str:
        return (f"{checkpoint}: Dice {result['dice']:.2f}%  HD95 {result['hd95_mm']:.2f} mm  val_loss {result['loss']:.4f}"
                f"  ({result['count']} volumes)\n" + _class_table(restored.classes, result["class_dice"]))

    def list_inputs(self, inputs: list[str]) -> list[str]:
        """NIfTI files named, or found (recursively) in the folders named."""
        return list_inputs(inputs, is_nifti, "a NIfTI file (.nii, .nii.gz)", "NIfTI volumes (.nii, .nii.gz)")

    def read_input(self, path: str) -> Any:
        try:
            return volume_info(Path(path))
        except UserError as error:
            raise UnreadableInput(str(error)) from error

    @torch.no_grad()
    def predict(self, restored: Restored, images: Iterable[tuple[str, Any]], options: VolumeOptions, device: Any,
                outputs: dict[str, Path] | None) -> Iterator[Prediction]:
        """Write <stem>_labels.nii.gz (class indices on the input's grid: its shape and affine) and <stem>_slices.png
        (three orthogonal slices through the predicted foreground's centre, tinted by class) per volume; the result
        counts the voxels of each class."""
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        _, nibabel = medical()
        metadata = restored.metadata
        transform = volume_transforms(metadata["modalities"], metadata["spacing"], None, 0.5, with_label=False)
        model = restored.model.to(device)
        for path, info in images:
            if info.channels != metadata["in_channels"]:
                yield Prediction(path, problem=f"{info.channels} modalities, the model takes {metadata['in_channels']}")
                continue
            sample = transform({"image": path})
            image = sample["image"]
            logits = sliding_window(model, image[None].to(device), restored.img_size, options.overlap)
            sample["pred"] = MetaTensor(logits.argmax(1).cpu().float(), meta=image.meta,
                                        applied_operations=image.applied_operations)
            labels = Invertd("pred", transform, orig_keys="image", nearest_interp=True)(sample)["pred"]
            labels = plain(labels)[0].round().to(torch.uint8).numpy()
            source = nibabel.load(path)
            stem = os.fspath(outputs[path]).removesuffix(".nii")  # x.nii.gz's stem is x
            files = (f"{stem}_labels.nii.gz", f"{stem}_slices.png")
            _save_nifti(nibabel.Nifti1Image(labels, source.affine), files[0])
            zooms = tuple(float(zoom) for zoom in source.header.get_zooms()[:3])  # the file's own axis order
            _save_slices(np.asarray(source.dataobj, dtype=np.float32), labels, zooms, restored.classes, files[1])
            values, counts = np.unique(labels, return_counts=True)
            yield Prediction(path, {"voxels": {restored.classes[v]: int(n) for v, n in zip(values, counts)}}, files)

    def prediction_text(self, prediction: Prediction) -> str:
        return f"{prediction.image} -> {', '.join(prediction.files)}"


def class_scores(predicted: Tensor, truth: Tensor, classes: int, spacing: Sequence[float]
                 ) -> list[tuple[float | None, float | None]]:
    """(Dice as a fraction, HD95 in mm) of each foreground class of one volume's predicted and true labels (D, H, W),
    MONAI's; (None, None) for a class absent from the truth. A class present in the truth that the prediction
    misses scores Dice 0 and, for HD95, the volume's diagonal in mm (MONAI gives no finite distance)."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    indices = torch.arange(classes, device=truth.device).view(1, -1, 1, 1, 1)
    predicted_masks, true_masks = (predicted[None, None] == indices), (truth[None, None] == indices)  # (1, K, D, H, W)
    dice = compute_dice(predicted_masks, true_masks, include_background=False)[0]
    with warnings.catch_warnings():  # a class absent from the prediction or the truth: handled below
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)  # MONAI 1.6 about an argument of its own internals
        distance = compute_hausdorff_distance(predicted_masks, true_masks, percentile=95, spacing=list(spacing))[0]
    diagonal = math.sqrt(sum((size * step) ** 2 for size, step in zip(truth.shape, spacing)))
    scores = []
    for index in range(1, classes):
        if not true_masks[0, index].any():
            scores.append((None, None))
        elif not predicted_masks[0, index].any():
            scores.append((0.0, diagonal))
        else:
            scores.append((dice[index - 1].item(), distance[index - 1].item()))
    return scores


def _mean(values: list[float | None]) -> float:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else math.nan


def _class_table(classes: list[str], dice: list[float | None]) -> str:
    return "\n".join(f"  {name:<20} Dice {'-' if value is None else f'{value:.2f}%'}"
                     for name, value in zip(classes[1:], dice))


def _save_nifti(volume: Any, path: str) -> None:
    """A NIfTI image as a .nii.gz file, atomically."""
    import gzip

    from ..files import atomic_output

    with atomic_output(path) as temp:
        temp.write_bytes(gzip.compress(volume.to_bytes()))


def _save_slices(image: np.ndarray, labels: np.ndarray, spacing: tuple[float, ...], classes: list[str], path: str) -> None:
    """Axial, coronal and sagittal slices (voxel axes 2, 1, 0 held) through the centre of the predicted foreground
    (the volume's centre if none), each stretched to its physical aspect, side by side, tinted by class."""
    from PIL import Image

    from ..dense.drawing import overlay
    from ..files import save_png

    grey = image if image.ndim == 3 else image[..., 0]  # the first modality
    low, high = np.percentile(grey, (0.5, 99.5))
    grey = np.clip((grey - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)
    foreground = np.argwhere(labels > 0)
    centre = foreground.mean(0).round().astype(int) if len(foreground) else np.array(labels.shape) // 2
    panels_image, panels_labels = [], []
    for held in (2, 1, 0):
        axes = [axis for axis in range(3) if axis != held]
        take = [slice(None)] * 3
        take[held] = int(centre[held])
        size = (round(labels.shape[axes[0]] * spacing[axes[0]]), round(labels.shape[axes[1]] * spacing[axes[1]]))
        # rows: the second kept axis, top down; columns: the first
        picture = Image.fromarray(np.flipud(grey[tuple(take)].T)).resize(size, Image.BILINEAR)
        mask = Image.fromarray(np.flipud(labels[tuple(take)].T)).resize(size, Image.NEAREST)
        panels_image.append(np.asarray(picture))
        panels_labels.append(np.asarray(mask))
    height = max(panel.shape[0] for panel in panels_image)
    gap = 4
    row_image = np.full((height, sum(p.shape[1] for p in panels_image) + gap * 2), 255, np.uint8)
    row_labels = np.zeros_like(row_image)
    left = 0
    for picture, mask in zip(panels_image, panels_labels):
        row_image[: picture.shape[0], left: left + picture.shape[1]] = picture
        row_labels[: mask.shape[0], left: left + mask.shape[1]] = mask
        left += picture.shape[1] + gap
    save_png(overlay(Image.fromarray(row_image).convert("RGB"), row_labels, classes), path)
