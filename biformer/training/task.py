"""What the training engine asks of a task (classification, segmentation, detection), and what tasks share.

The engine owns the run: data order, seeding, optimization, checkpoints, resume, DDP. A task supplies
the data sets, the model, the loss and the metrics. Batches are (images, targets, problems): the
problems name samples that could not be read (dropped from the batch, reported once, counted).
"""
from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .config import TrainConfig
from .runtime import Dist


class UnreadableImages:
    """Reports each unreadable sample once, with its path, and counts them over all ranks."""

    def __init__(self) -> None:
        self.problems: set[str] = set()

    def add(self, problems: list[str]) -> None:
        for problem in problems:
            if problem not in self.problems:
                self.problems.add(problem)
                tqdm.write(f"warning: skipping unreadable image {problem}", file=sys.stderr)

    def count(self, env: Dist) -> int:
        if env.world == 1:
            return len(self.problems)
        gathered: list[set[str] | None] = [None] * env.world
        dist.all_gather_object(gathered, self.problems)
        return len(set().union(*gathered))


def val_loader(dataset, batch_size: int, workers: int, env: Dist, collate: Callable) -> DataLoader:
    shard = Subset(dataset, range(env.rank, len(dataset), env.world))  # disjoint, nothing repeated
    return DataLoader(shard, batch_size=batch_size, num_workers=workers, shuffle=False, collate_fn=collate)


def eval_batches(loader: DataLoader, env: Dist, desc: str, unreadable: UnreadableImages | None):
    """The readable (images, targets) batches of a loader, moved to the device, with a progress bar."""
    for images, targets, problems in tqdm(loader, desc=desc, leave=False, disable=None if env.main else True,
                                          file=sys.stdout):
        if unreadable is not None:
            unreadable.add(problems)
        if images is not None:
            yield images.to(env.device), targets.to(env.device)


@dataclass
class Objective:
    """A task's training loss; `mixup` (classification only) mixes image and target pairs."""

    criterion: nn.Module
    mixup: Any = None
    aux_weight: float = 0.0  # weight of a segmentation model's auxiliary head loss


class Task(ABC):
    """The interface a task implements; see ClassificationTask and SegmentationTask."""

    name: str
    metric: str  # the validation metric that picks the best epoch (a metrics-row key, e.g. "val_top1")
    train_accuracy: str | None  # the metrics-row key of the training accuracy (None: the task counts none)
    collate: Callable  # the data loaders' collate function

    def check_config(self, config: TrainConfig) -> None:
        """UserError for options that make no sense for this task."""

    @abstractmethod
    def build_datasets(self, data: str, img_size: int, *, auto_augment: str | None = None, eval_only: bool = False):
        """Splits with .train, .val, .classes, .mean, .std."""

    @abstractmethod
    def build_model(self, config: TrainConfig, num_classes: int) -> nn.Module:
        """The model to train, with num_classes outputs."""

    @abstractmethod
    def build_objective(self, config: TrainConfig, num_classes: int, model: nn.Module) -> Objective:
        """The training loss."""

    def prepare(self, images: Tensor, targets: Any, objective: Objective) -> tuple[Tensor, Any, Any]:
        """(inputs, loss targets, targets for the training accuracy) of a batch on the device."""
        return images, targets, targets

    def forward(self, model: nn.Module, images: Any, targets: Any) -> Any:
        """A training step's model outputs (detection models take the targets and return their losses)."""
        return model(images)

    @abstractmethod
    def loss(self, outputs: Any, targets: Any, objective: Objective) -> Tensor:
        """The loss of a batch's model outputs."""

    @abstractmethod
    def hits(self, outputs: Any, targets: Any) -> tuple[float, float]:
        """(correct, counted) for the training accuracy: images for classification, pixels for segmentation."""

    @abstractmethod
    def evaluate(self, model: nn.Module, loader: DataLoader, env: Dist, amp: str = "none", desc: str = "val",
                 unreadable: UnreadableImages | None = None) -> dict[str, Any]:
        """Metrics over the loader's shards on all ranks: "count", the task's own (percent) and, where the task
        has one, "loss"."""

    @abstractmethod
    def metric_columns(self) -> tuple[str, ...]:
        """The keys of `evaluate`'s result that go into a metrics row, prefixed with "val_"."""

    @abstractmethod
    def metadata(self, splits) -> dict[str, Any]:
        """What eval and predict need, beyond the model name, classes, size and normalization that every
        task's weights file records, to rebuild the model and its inputs."""

    @abstractmethod
    def summary(self, row: dict[str, Any], best: dict[str, Any], classes: list[str]) -> str:
        """The final report's first line (and anything the task adds, such as a per-class table)."""
