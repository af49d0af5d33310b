"""What a task (classification, segmentation, detection, ...) supplies to `biformer train`, `eval` and
`predict`, and what tasks share.

The engine owns the run: data order, seeding, optimization, checkpoints, resume, DDP. A task owns the
model names it answers for (`heads`, `claims`), the data sets, the model, the loss and the metrics; from a
weights file it restores the model (`restore`), reports its metrics (`report`) and predicts and draws
(`predict`). Batches are (images, targets, problems): the problems name samples that could not be read
(dropped from the batch, reported once, counted). `biformer.tasks.registry` lists the tasks.

A task's `eval` and `predict` options are typed (`EvalOptions`, `PredictOptions`: frozen dataclasses of
`biformer.config.option` fields); the commands generate their parsers from them, and `biformer.tasks.inference`
calls the same methods from Python. Tasks return results (metrics, `Prediction`s) and leave showing them to the
caller.
"""
from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..checkpoints.loading import load_weights
from ..checkpoints.weights import read_state_dict
from ..config import TASK_TRAIN_OPTIONS, TaskOptions, TrainConfig, builtin_defaults, flag
from ..dense.names import head_forms, is_head_model
from ..errors import UserError
from ..runtime import DistEnv


class UnreadableInput(Exception):
    """An input of `predict` that cannot be read; the message says why."""


class UnreadableImages:
    """Reports each unreadable sample once, with its path, and counts them over all ranks."""

    def __init__(self) -> None:
        self.problems: set[str] = set()

    def add(self, problems: list[str]) -> None:
        for problem in problems:
            if problem not in self.problems:
                self.problems.add(problem)
                tqdm.write(f"warning: skipping unreadable image {problem}", file=sys.stderr)

    def count(self, env: DistEnv) -> int:
        if not env.distributed:
            return len(self.problems)
        gathered: list[set[str] | None] = [None] * env.world
        dist.all_gather_object(gathered, self.problems)
        return len(set().union(*gathered))


def val_loader(dataset, batch_size: int, workers: int, env: DistEnv, collate: Callable) -> DataLoader:
    shard = Subset(dataset, range(env.rank, len(dataset), env.world))  # disjoint, nothing repeated
    return DataLoader(shard, batch_size=batch_size, num_workers=workers, shuffle=False, collate_fn=collate)


def eval_batches(loader: DataLoader, env: DistEnv, desc: str, unreadable: UnreadableImages | None):
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
    smoothing: float = 0.0  # label smoothing that the task applies to its targets (token labelling's class targets)

    def parts(self) -> dict[str, Tensor]:
        """The last batch's loss terms by name, for a criterion whose loss is a sum of named terms (it keeps them
        in `parts`); the engine logs their means as train_<name>."""
        return dict(getattr(self.criterion, "parts", {}))


@dataclass(frozen=True)
class NoOptions(TaskOptions):
    """The options of a task that takes none of its own."""


@dataclass(frozen=True)
class Prediction:
    """What a model predicted for one image: `result` holds JSON values (classes, counts, COCO results), `files`
    the paths written for it; `problem` says why nothing was predicted."""

    image: str  # the input's path
    result: dict[str, Any] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    problem: str | None = None
    readable: bool = True  # False: the file could not be read as an image (`problem` says why)


@dataclass
class Restored:
    """A model restored from a weights file, in eval mode, with its task and what its inputs and outputs need."""

    task: Task
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
    # the task-specific `train` options it takes (TrainConfig fields among TASK_TRAIN_OPTIONS; the others must keep
    # their defaults), and its own options of `eval` and `predict`
    train_options: ClassVar[frozenset[str]] = frozenset()
    EvalOptions: ClassVar[type[TaskOptions]] = NoOptions
    PredictOptions: ClassVar[type[TaskOptions]] = NoOptions
    predicts_files: ClassVar[bool] = False  # `predict` writes files into an output folder (else it only shows)
    input_noun: ClassVar[str] = "image"  # what the models take, for messages (video models: "clip")
    normalizes_inside: ClassVar[bool] = False  # its models normalize their inputs (`build_datasets` leaves them)
    metric: str  # the validation metric that picks the best epoch (a metrics-row key, e.g. "val_top1")
    train_accuracy: str | None  # the metrics-row key of the training accuracy (None: the task counts none)
    collate: Callable  # the data loaders' collate function

    @classmethod
    def claims(cls, model_name: str) -> bool:
        """Whether `model_name` is one of this task's models (default: a head of `heads` on a timm backbone)."""
        return is_head_model(model_name, cls.heads)

    @classmethod
    def options_type(cls, command: str) -> type[TaskOptions]:
        """The options the task takes for `command`: "eval" or "predict"."""
        return {"eval": cls.EvalOptions, "predict": cls.PredictOptions}[command]

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
            raise UserError(f"option(s) {', '.join(used)} do not apply to {config.model}, a {self.name} model: leave "
                            "them out")

    @abstractmethod
    def build_datasets(self, data: str, img_size: int, *, auto_augment: str | None = None,
                       random_erasing: float = 0.0, eval_only: bool = False,
                       normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None):
        """Splits with .train, .val, .classes, .mean, .std; normalization: the (mean, std) the model's inputs are
        normalized with (None: the data set's own; a task whose models normalize inside ignores it)."""

    def training_splits(self, config: TrainConfig, normalization: tuple[tuple[float, ...], tuple[float, ...]] | None):
        """The splits of a training run (default: `build_datasets` at the run's size, with its augmentation)."""
        return self.build_datasets(config.data, config.img_size, auto_augment=config.aa, random_erasing=config.reprob,
                                   normalization=normalization)

    def evaluation_splits(self, data: str, restored: Restored, options: TaskOptions,
                          normalization: tuple[tuple[float, ...], tuple[float, ...]] | None):
        """The splits `eval` reads the validation split of, for a restored model and the eval options."""
        return self.build_datasets(data, restored.img_size, eval_only=True, normalization=normalization)

    @abstractmethod
    def build_model(self, config: TrainConfig, classes: Sequence[str]) -> nn.Module:
        """The model to train, with an output per class (a classifier's --pretrained head is kept only for the
        same classes)."""

    def training_set(self, splits: Any, config: TrainConfig, model: nn.Module) -> Dataset:
        """The data set a run trains on, once its model is built (classification with --token-label pairs each
        image with its token labels, which need the model's token grid); by default the training split."""
        return splits.train

    def inference_model(self, model: nn.Module) -> nn.Module:
        """The part of a trained model that its weights files hold (what eval, predict and export restore); by
        default all of it."""
        return model

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
    def evaluate(self, model: nn.Module, loader: DataLoader, env: DistEnv, *, splits: Any,
                 options: TaskOptions | None = None, amp: str = "none", desc: str = "val",
                 unreadable: UnreadableImages | None = None) -> dict[str, Any]:
        """Metrics over the loader's shards on all ranks: "count", the task's own (percent) and, where the task
        has one, "loss". splits: what `build_datasets` returned (the loader reads its validation split);
        options: an `EvalOptions` (None: its defaults, as validation during training uses)."""

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

    def untrained_model(self, model_name: str, img_size: int, num_classes: int | None = None) -> nn.Module:
        """Model `model_name` with random weights and num_classes outputs (None: the reference data set's classes),
        to export or measure."""
        classes = [str(index) for index in range(num_classes or self.reference_classes)]
        return self.restored_model(model_name, {"classes": classes}, img_size).eval()

    def input_size(self, model: nn.Module, model_name: str, size: tuple[int, int], frames: int | None
                   ) -> tuple[int, tuple[int, ...]]:
        """(channels, spatial size) of one input of `model` at `size` (H, W), for counting its FLOPs: an image
        (clip models: `frames` frames, None for their reference clip's; volume models: a size[0]-deep volume)."""
        return getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0], size

    def reference_size(self, model_name: str) -> int:
        """The input side the model is measured at without one given: its reference data set's (ImageNet's 224
        here)."""
        return 224

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
        return Restored(self, model.eval(), model_name, list(metadata["classes"]), img_size, tuple(metadata["mean"]),
                        tuple(metadata["std"]), dict(metadata))

    @abstractmethod
    def report(self, result: dict[str, Any], restored: Restored, checkpoint: str) -> str:
        """`biformer eval`'s text for the metrics that `evaluate` returned."""

    def list_inputs(self, inputs: list[str]) -> list[str]:
        """The files `predict` reads from the paths given: image files, named or found in folders."""
        from ..data.images import list_images

        return list_images(inputs)

    def read_input(self, path: str) -> Any:
        """One input of `predict` (an RGB image); UnreadableInput saying why it cannot be read."""
        from ..data.images import UNREADABLE_ERRORS, open_rgb

        try:
            return open_rgb(path)
        except UNREADABLE_ERRORS as error:
            raise UnreadableInput(str(error)) from error

    def check_predict(self, options: TaskOptions, files: list[str]) -> None:
        """UserError for `predict` options that do not fit the files, before the model is loaded or anything
        written (the options check themselves when built)."""

    @abstractmethod
    def predict(self, restored: Restored, images: Iterable[tuple[str, Any]], options: TaskOptions, device: Any,
                outputs: dict[str, Path] | None) -> Iterator[Prediction]:
        """A `Prediction` per (path, RGB image), as each is done; where `predicts_files`, the pictures go to
        `outputs[path]` + a suffix (one stem per input, distinct, in one folder). An image it cannot predict gets
        a Prediction with its `problem`."""

    def prediction_text(self, prediction: Prediction) -> str:
        """`biformer predict`'s text for one image's prediction."""
        return f"{prediction.image}: {prediction.result}"

    def write_predictions(self, predictions: list[Prediction], folder: Path | None) -> list[Path]:
        """Write the files that hold every image's predictions together into `folder` (detection: one COCO
        results file); the paths written."""
        return []
