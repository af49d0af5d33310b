"""`biformer eval` and `biformer predict` as functions of a restored model, callable from Python with a task's
typed options; the commands call the same functions and only show the results.

    import biformer.tasks as tasks
    restored = tasks.restore("runs/digits/best.safetensors")
    metrics = tasks.evaluate(restored, "digits")                          # {"top1": ..., "top5": ..., ...}
    options = restored.task.PredictOptions(topk=3)
    for prediction in tasks.predict(restored, ["images/"], options):     # Prediction(image, result, files)
        print(prediction.image, prediction.result)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import UserError
from .base import Prediction, Restored, Task, UnreadableImages, UnreadableInput, val_loader


def _checked_options(task: Task, options: Any, command: str) -> Any:
    """`options` (None: the defaults) as the task's options of `command` ("eval" or "predict")."""
    expected = task.options_type(command)
    if options is None:
        return expected()
    if not isinstance(options, expected):
        raise TypeError(f"options must be a {expected.__name__} for {task.name} models, got {type(options).__name__}")
    return options


def evaluate(restored: Restored, data: str | None = None, options: Any = None, *, batch_size: int = 64,
             workers: int = 0, amp: str = "none", device: str | None = None) -> dict[str, Any]:
    """The metrics of `restored` on the validation split of `data` (None: its task's default data set), with
    "unreadable": the images that could not be read (skipped, reported on stderr)."""
    from ..runtime import DistEnv, resolve_amp, resolve_device

    task = restored.task
    options = _checked_options(task, options, "eval")
    env = DistEnv(device=resolve_device(device))
    recorded = "mean" in restored.metadata  # a file without statistics (a release .pth): the data set's own
    splits = task.evaluation_splits(data or task.default_data, restored, options,
                                    (restored.mean, restored.std) if recorded else None)
    _check_classes(splits.classes, restored.classes, restored.classes_recorded)
    unreadable = UnreadableImages()
    loader = val_loader(splits.val, batch_size, workers, env, task.collate)
    result = task.evaluate(restored.model.to(env.device), loader, env, splits=splits, options=options,
                           amp=resolve_amp(amp, env.device), unreadable=unreadable)
    return {**result, "unreadable": unreadable.count(env)}


def _check_classes(found: list[str], saved: list[str], recorded: bool = True) -> None:
    if len(found) != len(saved):
        raise UserError(f"--data has {len(found)} classes but the checkpoint has {len(saved)}")
    if recorded and found != saved:
        raise UserError(f"--data classes {found[:5]}... differ from the checkpoint's {saved[:5]}...")


def prediction_outputs(task: Task, files: list[str], options: Any, output: str | os.PathLike | None
                       ) -> dict[str, Path] | None:
    """Check `predict`'s inputs before a model is loaded: the task's check of its options against the files,
    and (for a task that writes pictures) the output folder; each file's output stem, or None."""
    task.check_predict(options, files)
    if not task.predicts_files:
        if output is not None:
            raise UserError(f"--output is for models that write pictures; a {task.name} model's predictions are "
                            "printed: leave it out")
        return None
    if output is None:
        raise UserError(f"--output FOLDER is required for a {task.name} checkpoint (the PNG files go there)")
    from ..files import output_folder

    return output_stems(files, output_folder(output, "--output"))


def output_stems(files: list[str], folder: Path) -> dict[str, Path]:
    """Each input's output path without suffix: its path relative to the folder all inputs share, under
    `folder`, so that a/x.png and b/x.png do not write over each other."""
    absolute = [os.path.abspath(path) for path in files]
    common = os.path.commonpath([os.path.dirname(path) for path in absolute])
    return {path: folder / Path(os.path.relpath(full, common)).with_suffix("") for path, full in zip(files, absolute)}


def iter_predictions(restored: Restored, files: list[str], options: Any, outputs: dict[str, Path] | None,
                     device: str | None = None) -> Iterator[Prediction]:
    """A Prediction per file as each is done (options: the task's PredictOptions; outputs: `prediction_outputs`');
    an unreadable file gets one with its problem."""
    from ..runtime import resolve_device

    for stem in (outputs or {}).values():  # only once a model loaded: no empty folders otherwise
        stem.parent.mkdir(parents=True, exist_ok=True)
    unreadable: list[Prediction] = []

    task = restored.task

    def readable() -> Iterator[tuple[str, Any]]:
        for path in files:
            try:
                item = task.read_input(path)
            except UnreadableInput as error:
                unreadable.append(Prediction(path, problem=str(error), readable=False))
                continue
            yield path, item

    for prediction in task.predict(restored, readable(), options, resolve_device(device), outputs):
        while unreadable:
            yield unreadable.pop(0)
        yield prediction
    yield from unreadable


def predict(restored: Restored, inputs: Sequence[str | os.PathLike], options: Any = None, *,
            output: str | os.PathLike | None = None, device: str | None = None) -> list[Prediction]:
    """The predictions of `restored` for image (or clip) files or folders (searched recursively); a task that
    writes pictures (segmentation, detection) writes them, and its files that cover every image, into `output`."""
    task = restored.task
    options = _checked_options(task, options, "predict")
    files = task.list_inputs([os.fspath(item) for item in inputs])
    outputs = prediction_outputs(task, files, options, output)
    predictions = list(iter_predictions(restored, files, options, outputs, device))
    if task.predicts_files and any(prediction.problem is None for prediction in predictions):
        task.write_predictions(predictions, Path(os.path.expanduser(os.fspath(output))))
    return predictions
