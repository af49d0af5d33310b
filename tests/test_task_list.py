"""The task list: a task defined here, outside the package, trains, evaluates and predicts through the command
line once it is registered; and the list answers which task a model name or a weights file belongs to."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform
from torch import nn

from biformer.cli import main
from biformer.config import TaskOptions, option
from biformer.data.classification import collate_readable
from biformer.data.digits import digit_image
from biformer.runtime import all_reduce_sum, autocast
from biformer.tasks import (
    Objective,
    Prediction,
    Task,
    register_task,
    task_for_checkpoint,
    task_for_model,
    unregister_task,
)
from biformer.tasks.base import eval_batches
from biformer.tasks.classification import ClassificationTask

@dataclass(frozen=True)
class DigitValueEvalOptions(TaskOptions):
    close: float = option(0.5, "a predicted digit value this near the true one counts as right", least=0)


@dataclass(frozen=True)
class DigitValuePredictOptions(TaskOptions):
    decimals: int = option(2, "digits after the point in the printed value", least=0)


class DigitValueTask(Task):
    """Image-level regression: the value (0..9) of the digit in an image, by a timm backbone with one output.
    Models are `digitvalue_<backbone>`; the metric is the share of images predicted within --close."""

    name = "digit-value"
    heads = ("digitvalue",)
    default_data = "digits"
    EvalOptions = DigitValueEvalOptions
    PredictOptions = DigitValuePredictOptions
    metric = "val_close"
    train_accuracy = None
    collate = staticmethod(collate_readable)

    def build_datasets(self, data: str, img_size: int, *, auto_augment: str | None = None,
                       random_erasing: float = 0.0, eval_only: bool = False, normalization=None):
        return ClassificationTask().build_datasets(data, img_size, eval_only=eval_only, normalization=normalization)

    def _network(self, model_name: str) -> nn.Module:
        return timm.create_model(model_name.partition("_")[2], num_classes=1)

    def build_model(self, config, num_classes: int) -> nn.Module:
        return self._network(config.model)

    def build_objective(self, config, num_classes: int, model: nn.Module) -> Objective:
        return Objective(nn.MSELoss())

    def loss(self, outputs, targets, objective: Objective):
        return objective.criterion(outputs[:, 0].float(), targets.float())

    def hits(self, outputs, targets) -> tuple[float, float]:
        return 0.0, 0.0

    @torch.no_grad()
    def evaluate(self, model, loader, env, *, splits, options=None, amp="none", desc="val", unreadable=None):
        close_enough = (options or DigitValueEvalOptions()).close
        model.eval()
        totals = [0.0, 0.0, 0.0]  # absolute error sum, close, count
        for images, targets in eval_batches(loader, env, desc, unreadable):
            with autocast(env.device, amp):
                error = (model(images)[:, 0].float() - targets.float()).abs()
            totals = [a + b for a, b in zip(totals, (error.sum().item(), (error < close_enough).sum().item(), len(error)))]
        error_sum, close, count = all_reduce_sum(totals, env)
        return {"mae": error_sum / count, "close": 100 * close / count, "count": int(count)}

    def metric_columns(self) -> tuple[str, ...]:
        return ("close", "mae")

    def metadata(self, splits) -> dict[str, Any]:
        return {"crop_pct": splits.crop_pct}

    def summary(self, row, best, classes) -> str:
        return f"final validation close: {row['val_close']:.2f}% (mae {row['val_mae']:.3f})"

    def restored_model(self, model_name: str, metadata: dict[str, Any], img_size: int) -> nn.Module:
        return self._network(model_name)

    def report(self, result, restored, checkpoint: str) -> str:
        return f"{checkpoint}: close {result['close']:.2f}%  mae {result['mae']:.4f}  ({result['count']} images)"

    @torch.no_grad()
    def predict(self, restored, images, options, device, outputs):
        transform = create_transform(restored.img_size, crop_pct=restored.metadata["crop_pct"], mean=restored.mean,
                                     std=restored.std)
        for path, image in images:
            yield Prediction(path, {"value": round(restored.model(transform(image)[None]).item(), options.decimals)})

    def prediction_text(self, prediction) -> str:
        return f"{prediction.image}: value {prediction.result['value']}"


@pytest.fixture
def digit_value_task():
    register_task(DigitValueTask)
    yield DigitValueTask
    unregister_task(DigitValueTask)


@pytest.mark.slow
def test_a_task_from_outside_the_package_runs_through_train_eval_and_predict(digit_value_task, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "digitvalue_biformer_nano", "--data", "digits", "--img-size", "32",
                 "--epochs", "1", "--warmup-epochs", "0", "--no-tensorboard", "--output", str(run)]) == 0
    trained = capsys.readouterr().out
    assert "final validation close:" in trained
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val_close", "val_mae"} <= set(row) and "val_top1" not in row

    weights = run / "best.safetensors"
    task, metadata, name = task_for_checkpoint(weights)
    assert isinstance(task, DigitValueTask) and metadata["task"] == "digit-value" and name == "digitvalue_biformer_nano"

    assert main(["eval", "--checkpoint", str(weights), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["count"] == 360 and evaluated["close"] == pytest.approx(row["val_close"])

    images = tmp_path / "images"
    images.mkdir()
    for index in (0, 1):
        digit_image(index).resize((32, 32)).save(images / f"{index}.png")
    assert main(["predict", str(images), "--checkpoint", str(weights), "--json"]) == 0
    predicted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(line["image"]).name for line in predicted] == ["0.png", "1.png"]
    assert all(isinstance(line["value"], float) for line in predicted)

    assert main(["predict", str(images), "--checkpoint", str(weights), "--decimals", "1", "--json"]) == 0  # its own
    values = [json.loads(line)["value"] for line in capsys.readouterr().out.splitlines()]
    assert len(values) == 2 and all(value == round(value, 1) for value in values)
    assert main(["eval", "--checkpoint", str(weights), "--json", "--close", "1e9"]) == 0  # every value counts
    assert json.loads(capsys.readouterr().out)["close"] == 100

    assert main(["predict", str(images), "--checkpoint", str(weights), "--topk", "3"]) == 2  # a classifier's option
    assert "--topk is for video and classification models" in capsys.readouterr().err
    for command, flag in (("eval", "--close"), ("predict", "--decimals")):  # in the help, in a group of their own
        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = capsys.readouterr().out
        assert "digit-value models:" in shown and flag in shown


def test_model_names_and_weights_files_name_their_task(digit_value_task, tmp_path):
    assert isinstance(task_for_model("digitvalue_biformer_nano"), DigitValueTask)
    assert task_for_model("biformer_nano").name == "classification"
    assert task_for_model("upernet_biformer_nano").name == "segmentation"
    assert task_for_model("fcos_biformer_nano").name == "detection"
    with pytest.raises(Exception, match="digit-value: digitvalue_<backbone>"):
        task_for_model("nonsense_model")


def test_a_weights_file_without_a_task_is_a_classifier(tmp_path):
    """Files written before tasks were recorded (and `convert`'s) name their model but no task."""
    from biformer.checkpoints.weights import save_weights

    path = tmp_path / "old.safetensors"
    save_weights(path, timm.create_model("biformer_nano", num_classes=3), {"model": "biformer_nano"})
    task, _, name = task_for_checkpoint(path)
    assert task.name == "classification" and name == "biformer_nano"
    with pytest.raises(Exception, match="is a segmentation model but --checkpoint .* holds a classification model"):
        task_for_checkpoint(path, "sfpn_biformer_nano")


def test_predict_refuses_the_options_of_another_task_before_loading(tmp_path, capsys):
    from biformer.checkpoints.weights import save_weights

    path = tmp_path / "classifier.safetensors"
    save_weights(path, timm.create_model("biformer_nano", num_classes=3), {"model": "biformer_nano"})
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png"), "--checkpoint", str(path), "--score-threshold", "0.5"]) == 2
    assert "--score-threshold is for detection models" in capsys.readouterr().err
