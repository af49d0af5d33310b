"""What a task (classification, segmentation, detection, ...) supplies to `biformer train`, `eval` and
`predict`, and what tasks share.

The engine owns the run: data order, seeding, optimization, checkpoints, resume, DDP. A task owns the
model names it answers for (`heads`, `claims`), the data sets, the model, the loss and the metrics; from a
weights file it restores the model (`restore`), reports its metrics (`report`) and predicts and draws
(`predict`). Batches are (images, targets, problems): the problems name samples that could not be read
(dropped from the batch, reported once, counted). `biformer.tasks.registry` lists the tasks.
"""
from __future__ import annotations

import argparse
import os
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..checkpoints.loading import load_weights
from ..checkpoints.weights import read_state_dict
from ..config import TASK_TRAIN_OPTIONS, TrainConfig, builtin_defaults, flag
from ..dense.names import head_forms, is_head_model
from ..errors import UserError
from ..runtime import Dist


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


@dataclass
class Restored:
    """A model restored from a weights file, in eval mode, with what its inputs and outputs need."""

    model: nn.Module
    model_name: str
    classes: list[str]
    img_size: int  # the input size (segmentation and detection: the shorter side images are resized to)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    metadata: dict[str, Any] = field(default_factory=dict)  # all the file recorded (crop_pct, category_ids, ...)
    classes_recorded: bool = True  # the class names came from the file (not a default for a release file)


# what every weights file of `biformer train` records, whatever its task
RECORDED = ("model", "classes", "img_size", "mean", "std")


class Task(ABC):
    """The interface a task implements; see ClassificationTask, SegmentationTask and DetectionTask."""

    name: ClassVar[str]
    heads: ClassVar[tuple[str, ...]] = ()  # model-name prefixes it owns: <head>_<backbone>
    default_data: ClassVar[str]  # the data set `eval` uses when --data is not given
    reference_classes: ClassVar[int]  # the class count of the task's reference data set (an untrained model's)
    # the task-specific options it takes: of `train` (TrainConfig fields among TASK_TRAIN_OPTIONS), `eval` and
    # `predict` (argparse dests); the others must keep their defaults
    train_options: ClassVar[frozenset[str]] = frozenset()
    eval_options: ClassVar[frozenset[str]] = frozenset()
    predict_options: ClassVar[frozenset[str]] = frozenset()
    predicts_files: ClassVar[bool] = False  # `predict` writes files into --output (else it prints)
    metric: str  # the validation metric that picks the best epoch (a metrics-row key, e.g. "val_top1")
    train_accuracy: str | None  # the metrics-row key of the training accuracy (None: the task counts none)
    collate: Callable  # the data loaders' collate function

    @classmethod
    def claims(cls, model_name: str) -> bool:
        """Whether `model_name` is one of this task's models (default: a head of `heads` on a timm backbone)."""
        return is_head_model(model_name, cls.heads)

    @classmethod
    def model_forms(cls) -> str:
        """The accepted model-name forms, for messages."""
        return head_forms(cls.heads)

    @classmethod
    def for_model(cls, model_name: str) -> Task:
        """The task instance for one of its models (a detection task depends on the head)."""
        return cls()

    def check_config(self, config: TrainConfig) -> None:
        """UserError for options that make no sense for this task: by default the task-specific ones it does not
        take (a task with more rules extends this)."""
        defaults = builtin_defaults()
        used = [flag(name) for name in sorted(TASK_TRAIN_OPTIONS - self.train_options)
                if getattr(config, name) != defaults[name]]
        if used:
            raise UserError(f"classification-only option(s) {', '.join(used)}: leave them out for {config.model}, "
                            f"a {self.name} model")

    @abstractmethod
    def build_datasets(self, data: str, img_size: int, *, auto_augment: str | None = None,
                       random_erasing: float = 0.0, eval_only: bool = False):
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
        """The final report's first line (and anything the task adds, such as a per-class table); best["at"] says
        where the best validation was ("epoch 3", "iter 2000")."""

    # -- from a weights file: `biformer eval` and `biformer predict` --

    @abstractmethod
    def restored_model(self, model_name: str, metadata: dict[str, Any], img_size: int) -> nn.Module:
        """The untrained model that a weights file with this metadata holds the weights of."""

    def untrained_model(self, model_name: str, img_size: int) -> nn.Module:
        """Model `model_name` with random weights and the reference data set's classes (to export or measure)."""
        return self.restored_model(model_name, {"classes": [str(index) for index in range(self.reference_classes)]},
                                   img_size).eval()

    def deployable(self, model: nn.Module) -> nn.Module:
        """What `biformer export` writes of a restored model: images in, the task's raw outputs out."""
        return model

    def export_not_supported_reasons(self, settings: Any) -> list[str]:
        """Why this task's models cannot be exported with `settings` (a biformer.export.ExportSettings)."""
        return []

    def restore(self, checkpoint: str | os.PathLike, metadata: dict[str, Any], model_name: str,
                img_size: int | None = None) -> Restored:
        """The model of a weights file that `biformer train` wrote, with its classes and preprocessing;
        img_size replaces the training's input size."""
        missing = [key for key in RECORDED if key not in metadata]
        if missing:
            raise UserError(f"--checkpoint {os.fspath(checkpoint)!r} lacks {', '.join(missing)} in its metadata: "
                            f"{self.name} models are restored from the .safetensors files that `biformer train` writes")
        img_size = img_size or metadata["img_size"]
        model = self.restored_model(model_name, metadata, img_size)
        try:
            load_weights(model, read_state_dict(checkpoint), checkpoint)
        except ValueError as error:
            raise UserError(f"--checkpoint {os.fspath(checkpoint)!r}: {error}") from error
        return Restored(model.eval(), model_name, list(metadata["classes"]), img_size, tuple(metadata["mean"]),
                        tuple(metadata["std"]), dict(metadata))

    def configure(self, args: argparse.Namespace, restored: Restored) -> None:
        """Take this task's options of `eval` or `predict` (e.g. segmentation's inference mode)."""

    @abstractmethod
    def report(self, result: dict[str, Any], restored: Restored, checkpoint: str) -> str:
        """`biformer eval`'s text for the metrics that `evaluate` returned."""

    def check_predict(self, args: argparse.Namespace, files: list[str]) -> None:
        """UserError for `predict` options that do not fit, before the model is loaded or anything written."""

    @abstractmethod
    def predict(self, images: Iterable[tuple[str, Any]], restored: Restored, args: argparse.Namespace,
                device: Any, outputs: dict[str, Path] | None) -> list[str]:
        """Predict each (path, RGB image), printing a line (or JSON line) per image; where `predicts_files`,
        write the pictures to `outputs[path]` + a suffix (one stem per input, distinct, in --output). Returns
        the paths of the images it could not predict, each reported on stderr with the reason."""
