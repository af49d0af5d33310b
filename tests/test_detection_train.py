"""`biformer train/eval/predict` for detection: the engine with COCO AP rows, exact resume after SIGKILL, the
COCO results JSON of predict read back by pycocotools, bad input refused."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from safetensors.torch import load_file
from tiny_data import CATEGORY_IDS, CLASSES, make_coco_folder, read_metrics

from biformer.checkpoints.weights import read_metadata
from biformer.cli import main
from biformer.data.coco import CocoDataset, ReadableSamples, collate_detection
from biformer.dense.detection import detection_model_for_size
from biformer.ops import BiLevelRoutingAttention
from biformer.tasks.registry import task_for_model

QUICK = ["--img-size", "64", "--no-tensorboard", "--warmup-epochs", "1", "--batch-size", "2", "--lr", "1e-3"]
DETECTION = ["--model", "maskrcnn_biformer_nano", *QUICK]
COMPARED = ("epoch", "train_loss", "val_bbox_ap", "val_bbox_ap50", "val_bbox_ap75", "val_segm_ap", "val_segm_ap50", "lr_group0")
HOOKED_TRAIN = Path(__file__).with_name("hooked_train.py")
# every training process of the bitwise comparisons on the thread count this process started with, whatever the
# environment it inherits meanwhile (another count rounds differently)
THREADS_ENV = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def _train_in_a_fresh_process(*arguments: str) -> None:
    """`biformer train` in its own process: a process's earlier torch.set_num_threads calls (the bench tests make
    some) change its float rounding, so runs compared bitwise each start fresh, as a user's runs do."""
    result = subprocess.run([sys.executable, "-m", "biformer", "train", *arguments], capture_output=True, text=True,
                            timeout=600, env=THREADS_ENV)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs of maskrcnn_biformer_nano on the tiny COCO folder."""
    data = make_coco_folder(tmp_path_factory.mktemp("coco"))
    out = tmp_path_factory.mktemp("run")
    _train_in_a_fresh_process(*DETECTION, "--data", str(data), "--epochs", "2", "--output", str(out))
    return data, out


@pytest.mark.slow
def test_training_writes_coco_metrics_and_the_task(trained):
    data, out = trained
    rows = read_metrics(out)
    assert [row["epoch"] for row in rows] == [1, 2]
    for row in rows:
        for key in ("val_bbox_ap", "val_bbox_ap50", "val_bbox_ap75", "val_segm_ap", "val_segm_ap50"):
            assert 0 <= row[key] <= 100
        assert "val_top1" not in row and "val_loss" not in row and "train_top1" not in row
        assert np.isfinite(row["train_loss"])
    metadata = read_metadata(out / "last.safetensors")
    assert metadata["task"] == "detection" and metadata["category_ids"] == list(CATEGORY_IDS)
    assert metadata["classes"] == list(CLASSES) and metadata["img_size"] == 64


@pytest.mark.slow
def test_eval_reproduces_the_last_epoch_and_prints_the_ap_table(trained, capsys):
    data, out = trained
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "last.safetensors"), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    last = read_metrics(out)[-1]
    for key in ("bbox_ap", "bbox_ap50", "segm_ap"):
        assert result[key] == pytest.approx(last[f"val_{key}"], abs=1e-9)
    assert result["count"] == 3 and result["bbox_apl"] is None  # no large object: NaN, written as null
    assert main(["eval", "--checkpoint", str(out / "last.safetensors"), "--data", str(data)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^bbox(\s+-?[\d.]+|\s+nan){6}$", text, flags=re.M)
    assert re.search(r"^segm(\s+-?[\d.]+|\s+nan){6}$", text, flags=re.M)


@pytest.mark.slow
def test_predict_writes_pictures_and_results_that_pycocotools_loads(trained, tmp_path, capsys):
    data, out = trained
    files = [str(data / "val" / f"{index}.png") for index in range(3)]
    annotations = data / "annotations" / "instances_val.json"
    assert main(["predict", *files, "--checkpoint", str(out / "best.safetensors"), "--output", str(tmp_path / "pred"),
                 "--annotations", str(annotations), "--score-threshold", "0"]) == 0
    for index in range(3):
        picture = Image.open(tmp_path / "pred" / f"{index}_detections.png")
        assert picture.size == (384, 384)  # 64 px enlarged 6x
    results = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert results, "with --score-threshold 0 the model's own 0.05 cut-off is lifted: some box always scores"
    assert {entry["image_id"] for entry in results} <= {100, 101, 102}
    assert {entry["category_id"] for entry in results} <= set(CATEGORY_IDS)
    ground_truth = COCO()
    ground_truth.dataset = json.loads(annotations.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
        loaded = ground_truth.loadRes(str(tmp_path / "pred" / "detections.json"))
    assert len(loaded.getAnnIds()) == len(results)
    assert all("segmentation" in entry for entry in results)
    capsys.readouterr()
    (tmp_path / "odd.png").write_bytes((data / "val" / "0.png").read_bytes())
    assert main(["predict", str(tmp_path / "odd.png"), "--checkpoint", str(out / "best.safetensors"), "--output",
                 str(tmp_path / "odd"), "--annotations", str(annotations)]) == 2
    assert "lists no image named 'odd.png'" in capsys.readouterr().err
    assert not (tmp_path / "odd").exists()  # refused before anything is loaded or written


@pytest.mark.slow
def test_fcos_trains_and_evaluates_boxes_only(tmp_path, capsys):
    data, out = make_coco_folder(tmp_path / "coco"), tmp_path / "run"
    arguments = ["--model", "fcos_biformer_nano", *QUICK, "--data", str(data), "--epochs", "1"]
    assert main(["train", *arguments, "--output", str(out)]) == 0
    row, = read_metrics(out)
    assert 0 <= row["val_bbox_ap50"] <= 100 and "val_segm_ap" not in row
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "last.safetensors"), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bbox_ap"] == pytest.approx(row["val_bbox_ap"], abs=1e-9) and "segm_ap" not in result


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(trained, tmp_path):
    """Killed in epoch 2, resumed: the same weights and metrics rows as the uninterrupted run."""
    data, reference = trained
    common = [*DETECTION, "--data", str(data), "--epochs", "2"]
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, str(HOOKED_TRAIN), "--kill-at-step", "4", *common, "--output", str(out)],
                            capture_output=True, text=True, timeout=600, env=THREADS_ENV)  # 3 steps per epoch
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [row["epoch"] for row in read_metrics(out)] == [1]
    killed_epoch_1 = read_metrics(out)
    _train_in_a_fresh_process(*common, "--output", str(out), "--resume")
    strip = lambda rows: [{k: row[k] for k in COMPARED} for row in rows]  # noqa: E731
    # where a difference starts says what to suspect: in epoch 1, before any kill, the runs themselves differ
    # (non-determinism); in epoch 2 only, the resume
    assert strip(killed_epoch_1) == strip(read_metrics(reference))[:1], "epoch 1 differs before any kill"
    expected, got = load_file(reference / "last.safetensors"), load_file(out / "last.safetensors")
    differing = {key: (expected[key] - got[key]).abs().max().item() for key in expected
                 if key in got and not torch.equal(expected[key], got[key])}
    assert expected.keys() == got.keys() and not differing, f"after the resume: {len(differing)} tensors differ, " \
        f"the largest by {max(differing.values(), default=0):.3g} ({sorted(differing)[:5]})"
    assert strip(read_metrics(out)) == strip(read_metrics(reference))


def test_task_for_model_and_the_scaled_recipe():
    for name in ("retinanet_resnet18", "fcos_biformer_nano"):
        assert task_for_model(name).metric_columns() == ("bbox_ap", "bbox_ap50", "bbox_ap75")
    assert task_for_model("maskrcnn_biformer_tiny").metric_columns()[-2:] == ("segm_ap", "segm_ap50")
    small = detection_model_for_size("maskrcnn_biformer_nano", 3, 128)
    assert (small.transform.min_size, small.transform.max_size) == ((128,), 213)
    assert small.rpn._post_nms_top_n == {"training": 160, "testing": 160}
    assert small.roi_heads.fg_bg_sampler.batch_size_per_image == 82 and small.roi_heads.detections_per_img == 16
    assert {module.n_win for module in small.backbone.body.modules() if isinstance(module, BiLevelRoutingAttention)} \
        == {(3, 3)}
    full = detection_model_for_size("maskrcnn_resnet18", 3, 800)
    assert full.rpn._post_nms_top_n["training"] == 1000 and full.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    assert full.roi_heads.detections_per_img == 100
    assert detection_model_for_size("retinanet_resnet18", 3, 128).transform.max_size == 213


def test_unreadable_images_are_skipped_with_their_problem(tmp_path):
    data = make_coco_folder(tmp_path / "coco", train=2, val=2)
    (data / "val" / "0.png").write_bytes(b"not a png")
    samples = ReadableSamples(CocoDataset(data / "annotations" / "instances_val.json", data / "val"))
    images, targets, problems = collate_detection([samples[0], samples[1]])
    assert len(images) == len(targets) == 1 and len(problems) == 1 and "0.png" in problems[0]
    assert collate_detection([samples[0]]) == (None, None, [problems[0]])
    moved = targets.to("cpu")
    assert set(moved[0]) == {"boxes", "labels", "masks", "image_id"}


@pytest.mark.parametrize("arguments,message", [
    (["--model", "retinanet_biformer_nano", "--data", "digits"], "--data digits is a classification data set"),
    (["--model", "retinanet_resnet18", "--data", "digit-scenes", "--mixup", "0.8"], r"option\(s\) --mixup do not apply"),
    (["--model", "maskrcnn_resnet18", "--data", "/nonexistent"], "detection models train on 'digit-scenes' or a folder"),
])
def test_mismatched_options_are_refused_before_any_output(tmp_path, capsys, arguments, message):
    assert main(["train", *arguments, "--output", str(tmp_path / "run"), "--no-tensorboard"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()
