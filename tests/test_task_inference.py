"""`biformer.tasks.evaluate` and `predict` from Python, with each built-in task's typed options and no parser, give
the same metrics and predictions as `biformer eval` and `biformer predict` on the same weights file."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from biformer.checkpoints.weights import save_weights
from biformer.cli import main
from biformer.config import TrainConfig
from biformer.data.digits import digit_image
from biformer.data.scenes import digit_scenes_folder
from biformer.recipes import resolve
from biformer.tasks import Prediction, evaluate, predict, restore, task_for_model

# (model, options as the command line gives them, the same as keyword arguments of the task's options)
CASES = {
    "classification": ("biformer_nano", [], {}, ["--topk", "3"], {"topk": 3}),
    "segmentation": ("sfpn_biformer_nano", ["--mode", "slide", "--window", "64", "--stride", "48", "--flip"],
                     {"mode": "slide", "window": 64, "stride": 48, "flip": True}, ["--flip"], {"flip": True}),
    "detection": ("fcos_biformer_nano", [], {}, ["--score-threshold", "0"], {"score_threshold": 0.0}),
}


def weights_file(folder: Path, model_name: str) -> Path:
    """An untrained model saved with the metadata `biformer train` records (built as the engine builds it)."""
    task = task_for_model(model_name)
    img_size = 32 if task.name == "classification" else 64
    splits = task.build_datasets(task.default_data, img_size, eval_only=True)
    torch.manual_seed(0)
    model = task.build_model(resolve(TrainConfig(model=model_name, img_size=img_size)).config, splits.classes)
    path = folder / f"{model_name}.safetensors"
    save_weights(path, model, {"model": model_name, "task": task.name, "classes": splits.classes,
                               "img_size": img_size, "mean": list(splits.mean), "std": list(splits.std),
                               **task.metadata(splits)})
    return path


def as_json(result: dict) -> dict:
    """What `eval --json` prints of a result (NaN as null)."""
    return json.loads(json.dumps({key: None if isinstance(value, float) and math.isnan(value) else value
                                  for key, value in result.items()}))


@pytest.mark.slow
@pytest.mark.parametrize("task_name", list(CASES))
def test_python_and_the_command_line_agree(task_name, tmp_path, capsys):
    model_name, eval_flags, eval_kwargs, predict_flags, predict_kwargs = CASES[task_name]
    checkpoint = weights_file(tmp_path, model_name)
    restored = restore(checkpoint)
    assert restored.task.name == task_name

    metrics = evaluate(restored, None, restored.task.EvalOptions(**eval_kwargs), batch_size=8)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--json", "--batch-size", "8", *eval_flags]) == 0
    assert json.loads(capsys.readouterr().out) == as_json(metrics)
    assert metrics["count"] > 0 and metrics["unreadable"] == 0

    folder = tmp_path / "images"
    folder.mkdir()
    if task_name == "classification":  # two digits written as files
        for index in (3, 7):
            digit_image(index).resize((32, 32)).save(folder / f"digit{index}.png")
    else:  # two digit scenes
        for path in sorted((digit_scenes_folder() / "images" / "val").iterdir())[:2]:
            (folder / path.name).write_bytes(path.read_bytes())
    python_output = tmp_path / "py" if restored.task.predicts_files else None
    predicted = predict(restored, [folder], restored.task.PredictOptions(**predict_kwargs), output=python_output)
    assert all(isinstance(entry, Prediction) and entry.problem is None for entry in predicted) and len(predicted) == 2
    capsys.readouterr()
    output = ["--output", str(tmp_path / "cli")] if restored.task.predicts_files else []
    assert main(["predict", str(folder), "--checkpoint", str(checkpoint), "--json", *output, *predict_flags]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line.pop("image") for line in lines] == [entry.image for entry in predicted]
    files = [line.pop("files") for line in lines]
    assert lines == [json.loads(json.dumps(entry.result)) for entry in predicted]
    for python_files, command_files in zip((entry.files for entry in predicted), files):  # same names, other folder
        assert [Path(name).name for name in python_files] == [Path(name).name for name in command_files]
        assert all(Path(name).is_file() for name in (*python_files, *command_files))
    if task_name == "classification":
        assert all(len(entry.result["predictions"]) == 3 for entry in predicted)  # the option reached the task
    if task_name == "detection":  # with no cut-off, random weights detect something: the lists compared are not empty
        assert all(entry.result["detections"] for entry in predicted)
        assert json.loads((tmp_path / "py" / "detections.json").read_text()) == \
            json.loads((tmp_path / "cli" / "detections.json").read_text())


def test_options_of_another_task_are_refused_with_their_type(tmp_path):
    checkpoint = tmp_path / "classifier.safetensors"
    save_weights(checkpoint, task_for_model("biformer_nano").build_model(resolve(TrainConfig()).config, ["a", "b", "c"]),
                 {"model": "biformer_nano"})
    restored = restore(checkpoint)
    digit_image(1).save(tmp_path / "one.png")
    with pytest.raises(TypeError, match="ClassificationPredictOptions for classification models, got "
                                        "DetectionPredictOptions"):
        predict(restored, [tmp_path / "one.png"], task_for_model("fcos_biformer_nano").PredictOptions())
