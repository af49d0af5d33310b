"""Image classification: the digits or an ImageNet-style folder, any timm classifier, top-1/top-5."""
from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..errors import UserError
from .config import TrainConfig
from .data import DataSplits, build_datasets, collate_readable
from .runtime import Dist, all_reduce_sum, autocast
from .task import Objective, Task, UnreadableImages, eval_batches


class ClassificationTask(Task):
    name = "classification"
    metric = "val_top1"
    train_accuracy = "train_top1"
    collate = staticmethod(collate_readable)

    def build_datasets(self, data: str, img_size: int, *, auto_augment: str | None = None,
                       eval_only: bool = False) -> DataSplits:
        if data == "digit-scenes":
            raise UserError("--data digit-scenes is a segmentation data set; train a segmentation model on it "
                            "(sfpn_<backbone> or upernet_<backbone>, e.g. sfpn_biformer_tiny)")
        return build_datasets(data, img_size, auto_augment=auto_augment, eval_only=eval_only)

    def build_model(self, config: TrainConfig, num_classes: int) -> nn.Module:
        try:
            return timm.create_model(config.model, num_classes=num_classes, drop_path_rate=config.drop_path or 0.0,
                                     **config.model_arguments())
        except (TypeError, ValueError) as error:
            if not config.model_kwargs:
                raise
            raise UserError(f"--model-kwargs {' '.join(config.model_kwargs)}: {config.model} refused them: {error}") from error

    def build_objective(self, config: TrainConfig, num_classes: int, model: nn.Module) -> Objective:
        if config.mixup > 0 or config.cutmix > 0:
            return Objective(SoftTargetCrossEntropy(), Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                                                             label_smoothing=config.smoothing, num_classes=num_classes))
        if config.smoothing > 0:
            return Objective(LabelSmoothingCrossEntropy(config.smoothing))
        return Objective(nn.CrossEntropyLoss())

    def prepare(self, images: Tensor, targets: Tensor, objective: Objective) -> tuple[Tensor, Tensor, Tensor]:
        if objective.mixup is None:
            return images, targets, targets
        if len(images) % 2:  # mixup pairs images up
            images, targets = images[:-1], targets[:-1]
        mixed_images, mixed_targets = objective.mixup(images, targets)
        return mixed_images, mixed_targets, targets

    def loss(self, outputs: Tensor, targets: Tensor, objective: Objective) -> Tensor:
        return objective.criterion(outputs.float(), targets)

    def hits(self, outputs: Tensor, targets: Tensor) -> tuple[float, float]:
        return (outputs.argmax(1) == targets).sum().item(), len(targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, env: Dist, amp: str = "none", desc: str = "val",
                 unreadable: UnreadableImages | None = None) -> dict[str, Any]:
        """Loss, top-1 and top-5 (percent)."""
        model.eval()
        totals = [0.0, 0.0, 0.0, 0.0]  # loss sum, top-1 hits, top-5 hits, count
        for images, targets in eval_batches(loader, env, desc, unreadable):
            with autocast(env.device, amp):
                logits = model(images)
            logits = logits.float()
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
            totals[0] += F.cross_entropy(logits, targets, reduction="sum").item()
            totals[1] += hits[:, 0].sum().item()
            totals[2] += hits.any(1).sum().item()
            totals[3] += len(targets)
        loss, top1, top5, count = all_reduce_sum(totals, env)
        if count == 0:
            raise UserError("no validation image could be read")
        return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "count": int(count)}

    def metric_columns(self) -> tuple[str, ...]:
        return ("top1", "top5")

    def metadata(self, splits: DataSplits) -> dict[str, Any]:
        return {"crop_pct": splits.crop_pct}

    def summary(self, row: dict[str, Any], best: dict[str, Any], classes: list[str]) -> str:
        return f"final validation top-1: {row['val_top1']:.2f}% (best {best['val_top1']:.2f}% at epoch {best['epoch']})"
