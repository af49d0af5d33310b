"""The task list: which task a model name or a weights file belongs to, answered here and nowhere else.

Each task declares the model names it owns (`Task.claims`); classification owns every other timm model, so
it is asked last. `register_task` adds a task (a test's toy task, a user's own) ahead of the built-in ones.
A weights file names its task in its metadata ("task"); files written before tasks were recorded name none
and are classifiers.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..checkpoints.weights import UNRECORDED_TASK, read_metadata
from ..errors import CheckpointError, UserError
from .base import Restored, Task
from .classification import ClassificationTask
from .detection import DetectionTask
from .segmentation import SegmentationTask
from .video import VideoTask
from .volumes import VolumeSegmentationTask

# classification claims every timm model, clip models (biformer3d_*) included: it is asked last
TASKS: list[type[Task]] = [SegmentationTask, DetectionTask, VolumeSegmentationTask, VideoTask, ClassificationTask]


def register_task(task: type[Task]) -> type[Task]:
    """Add `task` to the list (ahead of the built-in tasks); usable as a class decorator."""
    if any(known.name == task.name for known in TASKS):
        raise ValueError(f"a task named {task.name!r} is registered already")
    TASKS.insert(0, task)
    return task


def unregister_task(task: type[Task]) -> None:
    TASKS.remove(task)


def task_for_model(model_name: str, option: str = "--model") -> Task:
    """The task of model `model_name`; UserError naming every task's model forms if none claims it (option: what
    the user gave it as)."""
    for task in TASKS:
        if task.claims(model_name):
            return task.for_model(model_name)
    forms = "; ".join(f"{task.name}: {task.model_forms()}" for task in TASKS)
    raise UserError(f"{option} {model_name!r} is no model of any task ({forms})")


def task_for_training(model_name: str, pretrained: str | os.PathLike | None) -> Task:
    """The task of a training run of `model_name`; UserError if --pretrained holds a model of another task (a
    classifier's weights start any model, as a dense model's backbone; others only a model of their own task)."""
    task = task_for_model(model_name)
    try:
        metadata = read_metadata(pretrained) if pretrained is not None else {}
    except CheckpointError as error:
        raise CheckpointError(f"--pretrained {os.fspath(pretrained)!r}: {error}") from error
    recorded = recorded_task(metadata) if "model" in metadata else None  # a release file records nothing
    if recorded not in (None, task.name, UNRECORDED_TASK):
        raise UserError(f"--pretrained {os.fspath(pretrained)!r} holds a {recorded} model ({metadata['model']}), and "
                        f"{model_name} is a {task.name} model: start it from a {task.name} model's weights or a "
                        "classifier's")
    return task


def recorded_task(metadata: dict) -> str:
    """The task a weights file's metadata names (files from before tasks were recorded: classification)."""
    return metadata.get("task", UNRECORDED_TASK)


def task_for_checkpoint(checkpoint: str | os.PathLike, model_name: str | None = None) -> tuple[Task, dict, str]:
    """(task, metadata, model name) of a weights file; `model_name` (--model) overrides the name it records and
    must belong to the task it records. UserError for a missing file, an unnamed model or a task mismatch."""
    path = Path(checkpoint)  # as given: the caller restores from this same path
    if not path.is_file():
        raise UserError(f"--checkpoint {os.fspath(checkpoint)!r} does not exist")
    metadata = read_metadata(path)
    name = model_name or metadata.get("model")
    if not name:
        raise UserError(f"--checkpoint {os.fspath(checkpoint)!r} does not name its model; pass --model")
    task = task_for_model(name)
    recorded = recorded_task(metadata) if "model" in metadata else task.name  # a release file records nothing
    if recorded != task.name:
        raise UserError(f"--model {name!r} is a {task.name} model but --checkpoint {os.fspath(checkpoint)!r} holds a "
                        f"{recorded} model ({metadata.get('model')!r}); leave --model out to use the file's own")
    return task, metadata, name


def restore(checkpoint: str | os.PathLike, model_name: str | None = None, img_size: int | None = None) -> Restored:
    """The ready-to-run model of any weights file (`biformer train`'s, `convert`'s or a release .pth with
    model_name), whatever its task, with its classes and preprocessing."""
    task, metadata, name = task_for_checkpoint(checkpoint, model_name)
    return task.restore(checkpoint, metadata, name, img_size)
