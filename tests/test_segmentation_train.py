"""`biformer train/eval/predict` for semantic segmentation: the classification engine with mIoU/aAcc, the
ADE20K layout counted exactly, overlays written, bad input refused."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_data import make_mask_folder, read_metrics

from biformer.checkpoints.weights import save_weights
from biformer.cli import main
from biformer.data.segmentation import ADE20K_CLASSES
from biformer.dense import create_segmentation_model

SEGMENTATION = ["--model", "sfpn_biformer_nano", "--img-size", "64", "--no-tensorboard", "--warmup-epochs", "1",
                "--batch-size", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs of sfpn_biformer_nano on a tiny mask folder, in-process."""
    data = make_mask_folder(tmp_path_factory.mktemp("masks"))
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *SEGMENTATION, "--data", str(data), "--epochs", "2", "--output", str(out)]) == 0
    return data, out


@pytest.mark.slow
def test_training_writes_segmentation_metrics(trained, capsys):
    data, out = trained
    rows = read_metrics(out)
    assert [row["epoch"] for row in rows] == [1, 2]
    for row in rows:
        assert 0 <= row["val_miou"] <= 100 and 0 <= row["val_aacc"] <= 100 and 0 <= row["train_aacc"] <= 100
        assert len(row["val_class_iou"]) == 3 and "val_top1" not in row
    assert rows[-1]["val_aacc"] > 50  # the grey background alone is most pixels


@pytest.mark.slow
def test_eval_and_resume_agree_with_the_run(trained, capsys, tmp_path):
    data, out = trained
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "last.safetensors"), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    last = read_metrics(out)[-1]
    assert result["miou"] == pytest.approx(last["val_miou"], abs=1e-9)
    assert result["aacc"] == pytest.approx(last["val_aacc"], abs=1e-9)
    assert sum(map(sum, result["confusion"])) == 4 * (64 * 64 - 1)  # every val pixel but the ignored one
    assert main(["eval", "--checkpoint", str(out / "last.safetensors"), "--data", str(data)]) == 0
    text = capsys.readouterr().out
    assert "mIoU" in text and "square" in text and "IoU (%)" in text
    assert main(["train", *SEGMENTATION, "--data", str(data), "--epochs", "2", "--output", str(out), "--resume"]) == 0
    assert "all 2 epochs were already done" in capsys.readouterr().out


@pytest.mark.slow
def test_predict_writes_an_overlay_and_a_label_png(trained, tmp_path, capsys):
    data, out = trained
    image = data / "images" / "val" / "0.jpg"
    assert main(["predict", str(image), "--checkpoint", str(out / "best.safetensors"),
                 "--output", str(tmp_path / "pred")]) == 0
    labels = np.array(Image.open(tmp_path / "pred" / "0_labels.png"))
    assert labels.shape == (64, 64) and set(np.unique(labels)) <= {0, 1, 2}
    overlay = Image.open(tmp_path / "pred" / "0_overlay.png")
    assert overlay.width >= 64 and overlay.height > 64  # the legend below the image (widened for "background")
    capsys.readouterr()
    assert main(["predict", str(image), "--checkpoint", str(out / "best.safetensors")]) == 2
    assert "--output FOLDER is required" in capsys.readouterr().err


def make_ade(root: Path) -> tuple[Path, np.ndarray]:
    """A two-image ADEChallengeData2016 folder; the annotations' value counts (index = file value)."""
    counts = np.zeros(256, np.int64)
    rng = np.random.default_rng(1)
    for part in ("training", "validation"):
        for index, (height, width) in enumerate([(40, 56), (48, 48)]):
            name = f"ADE_{part[:5] if part == 'training' else 'val'}_{index + 1:08d}"
            annotation = rng.choice([0, 1, 2, 7, 150], size=(height, width)).astype(np.uint8)
            for folder, picture in (("images", rng.integers(0, 255, (height, width, 3), dtype=np.uint8)),
                                    ("annotations", annotation)):
                (root / "ADEChallengeData2016" / folder / part).mkdir(parents=True, exist_ok=True)
                suffix = ".jpg" if folder == "images" else ".png"
                Image.fromarray(picture).save(root / "ADEChallengeData2016" / folder / part / f"{name}{suffix}")
            if part == "validation":
                counts += np.bincount(annotation.flatten(), minlength=256)
    return root / "ADEChallengeData2016", counts


def constant_segmenter(path: Path, predicted_class: int) -> Path:
    """A weights file of sfpn_biformer_nano for ADE20K whose classifier predicts one class everywhere."""
    model = create_segmentation_model("sfpn_biformer_nano", len(ADE20K_CLASSES))
    classifier = [module for module in model.head.modules() if isinstance(module, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.zero_()
        classifier.bias[predicted_class] = 1.0
    save_weights(path, model, {"model": "sfpn_biformer_nano", "task": "segmentation", "classes": ADE20K_CLASSES,
                               "img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    return path


def test_eval_counts_an_ade20k_folder_exactly(tmp_path, capsys):
    """ADE20K codes 0 as unlabelled and class c as c + 1: file value v lands in row v - 1, value 0 nowhere."""
    ade, counts = make_ade(tmp_path)
    checkpoint = constant_segmenter(tmp_path / "constant.safetensors", predicted_class=6)
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(ade), "--json", "--batch-size", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = np.zeros((150, 150), np.int64)
    expected[:, 6] = counts[1:151]  # every labelled pixel predicted as class 6 (file value 7)
    assert result["confusion"] == expected.tolist()
    assert result["aacc"] == pytest.approx(100 * counts[7] / counts[1:151].sum())
    iou_6 = counts[7] / counts[1:151].sum()  # predicted everywhere: its union is every labelled pixel
    assert result["class_iou"][6] == pytest.approx(iou_6)
    assert result["class_iou"][0] == 0 and result["class_iou"][3] is None  # value 1 present; value 4 absent
    assert result["miou"] == pytest.approx(100 * iou_6 / 4)  # IoU defined for file values 1, 2, 7, 150


@pytest.mark.parametrize("arguments,message", [
    (["--model", "sfpn_biformer_nano", "--data", "digits"], "--data digits is a classification data set"),
    (["--model", "biformer_nano", "--data", "digit-scenes"], "--data digit-scenes is a segmentation and detection data set"),
    (["--model", "sfpn_biformer_nano", "--data", "digit-scenes", "--mixup", "0.8"], r"option\(s\) --mixup do not apply"),
    (["--model", "sfpn_nonexistent_net", "--data", "digit-scenes"], "is no model of any task"),
])
def test_mismatched_task_options_are_refused_before_any_output(tmp_path, capsys, arguments, message):
    assert main(["train", *arguments, "--output", str(tmp_path / "run"), "--no-tensorboard"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()
