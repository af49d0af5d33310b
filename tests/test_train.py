"""`biformer train/eval/predict`: metrics, checkpoints, exact resume after SIGKILL, image folders, bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from biformer.cli import build_parser, main
from biformer.commands.train import config_from_args
from biformer.config import TrainConfig
from biformer.errors import UserError
from biformer.recipes import resolve

TINY = ["--model", "biformer_nano", "--img-size", "32", "--no-tensorboard", "--warmup-epochs", "1"]
DIGITS = ["--data", "digits", *TINY]
COMPARED = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr_group0")  # not the timings
RUN_FILES = ["best.safetensors", "config.json", "last.safetensors", "last.state.pt", "metrics.jsonl", "schedule.csv"]
HOOKED_TRAIN = Path(__file__).with_name("hooked_train.py")  # `biformer train` with test callbacks


def run_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_python("-m", "biformer", *args)


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def make_folder(root: Path, classes=("zero", "one"), per_class=6, val_per_class=None, val_classes=None) -> Path:
    """An ImageNet-layout folder of 40x40 digit PNGs: root/{train,val}/<class>/<n>.png."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for part, names, count in (("train", classes, per_class), ("val", val_classes or classes, val_per_class or per_class)):
        for label, name in enumerate(names):
            (root / part / name).mkdir(parents=True, exist_ok=True)
            picks = np.flatnonzero(digits.target == label % 10)[(part == "val") * per_class:][:count]
            for i in picks:
                pixels = np.clip(digits.images[i] * 16, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).resize((40, 40)).save(root / part / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch run on the digits, run in-process."""
    out = tmp_path_factory.mktemp("digits")
    assert main(["train", *DIGITS, "--epochs", "1", "--output", str(out)]) == 0
    return out


@pytest.mark.slow
def test_metrics_and_checkpoints_written(trained, capsys):
    rows = read_metrics(trained)
    assert [r["epoch"] for r in rows] == [1]
    for key in ("train_loss", "val_loss", "val_top1", "val_top5", "train_top1", "lr_group0", "lr_group1"):
        assert isinstance(rows[0][key], float), key
    assert rows[0]["val_top1"] > 50  # one epoch already learns the digits (chance: 10%)
    assert 0 <= rows[0]["val_top1"] <= rows[0]["val_top5"] <= 100
    assert sorted(p.name for p in trained.iterdir()) == RUN_FILES


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["last.safetensors", "best.safetensors"])
def test_eval_reproduces_training_accuracy(trained, capsys, weights):
    assert main(["eval", "--checkpoint", str(trained / weights), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    last = read_metrics(trained)[-1]
    assert result["count"] == 360  # the fixed 20% validation split of 1797 digits
    assert result["top1"] == pytest.approx(last["val_top1"], abs=1e-9)
    assert result["top5"] == pytest.approx(last["val_top5"], abs=1e-9)
    assert result["loss"] == pytest.approx(last["val_loss"], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("ten"), classes=[str(i) for i in range(10)], per_class=16,
                       val_per_class=4)


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(ten_classes, tmp_path):
    """Killed mid-epoch 2 (and again as if killed while saving epoch 2), resumed: same weights and metrics."""
    common = ["train", *TINY, "--data", str(ten_classes), "--epochs", "2", "--batch-size", "16", "--model-ema"]
    reference = tmp_path / "reference"
    assert main([*common, "--output", str(reference)]) == 0
    out = tmp_path / "killed"
    killed = run_python(str(HOOKED_TRAIN), "--kill-at-step", "14", *common[1:], "--output", str(out))  # 10 per epoch
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [r["epoch"] for r in read_metrics(out)] == [1]
    # weights of a later epoch whose state file was never committed must not be picked up
    shutil.copy(reference / "last.safetensors", out / "last.safetensors")
    resumed = run_cli(*common, "--output", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing at epoch 2" in resumed.stdout
    for name in ("last.safetensors", "last_ema.safetensors"):
        expected, got = load_file(reference / name), load_file(out / name)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), (name, key)
    strip = lambda rows: [{k: r[k] for k in (*COMPARED, "ema_val_top1", "ema_val_loss")} for r in rows]  # noqa: E731
    assert strip(read_metrics(out)) == strip(read_metrics(reference))
    assert sorted(p.name for p in out.iterdir()) == sorted([*RUN_FILES, "last_ema.safetensors"])  # no temporaries

    again = run_cli(*common, "--output", str(out), "--resume")  # nothing left to do
    assert again.returncode == 0 and "all 2 epochs were already done" in again.stdout
    assert len(read_metrics(out)) == 2


@pytest.mark.slow
def test_resume_with_other_settings_or_without_resume(trained, capsys):
    assert main(["train", *DIGITS, "--epochs", "2", "--lr", "1e-3", "--output", str(trained), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--epochs 1 -> 2" in err and "--lr 0.002 -> 0.001" in err and "Traceback" not in err
    assert main(["train", *DIGITS, "--epochs", "1", "--output", str(trained)]) == 2
    assert "already holds a training run (epoch 1); pass --resume" in capsys.readouterr().err
    assert [r["epoch"] for r in read_metrics(trained)] == [1]  # left as it was


# ---------------------------------------------------------------------------------------------
# image folders, predict and bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_image_folder_with_unreadable_images(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    (data / "train" / "one" / "broken.jpg").write_bytes(b"not a jpeg")
    buffer = tmp_path / "whole.jpg"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(buffer, quality=95)
    truncated = data / "val" / "zero" / "truncated.jpg"  # a valid header: only decoding finds the problem
    truncated.write_bytes(buffer.read_bytes()[:300])
    out = tmp_path / "out"
    assert main(["train", *TINY, "--data", str(data), "--epochs", "1", "--batch-size", "4", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"skipping unreadable image {data / 'train' / 'one' / 'broken.jpg'}" in err
    assert f"skipping unreadable image {truncated}" in err
    assert "2 unreadable image(s) were skipped" in err
    assert len(read_metrics(out)) == 1

    assert main(["eval", "--checkpoint", str(out / "last.safetensors"), "--data", str(data), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[-1])["count"] == 12  # 13 files, one unreadable
    assert "1 unreadable image(s) were skipped" in captured.err

    assert main(["predict", str(data / "val"), "--checkpoint", str(out / "last.safetensors"), "--json", "--topk", "2"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert len(lines) == 12
    for line in lines:
        assert [p["class"] for p in line["predictions"]] in (["zero", "one"], ["one", "zero"])
        assert sum(p["probability"] for p in line["predictions"]) == pytest.approx(1, abs=1e-5)
    assert f"skipping unreadable image {truncated}" in captured.err and "1 unreadable image(s) skipped" in captured.err

    image = data / "val" / "one" / sorted(os.listdir(data / "val" / "one"))[0]
    assert main(["predict", str(image), "--checkpoint", str(out / "best.safetensors"), "--topk", "1"]) == 0
    table = capsys.readouterr().out
    assert str(image) in table and ("zero" in table or "one" in table) and "%" in table


@pytest.mark.parametrize("case,message", [
    ("missing", "neither 'digits' nor an existing folder"),
    ("empty", "has no train/ sub-folder"),
    ("no_class_folders", "has no class sub-folders"),
    ("no_images", "class folder '{data}/train/a' holds no image files"),
    ("empty_train_class", "class folder '{data}/train/two' holds no image files"),
    ("empty_val_class", "class folder '{data}/val/one' holds no image files"),
    ("val_class_missing", "class folder(s) ['one'] of the training set are missing from"),
])
def test_bad_data_folders(tmp_path, capsys, case, message):
    """Reported before anything is written: --output is not even created."""
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
    elif case == "no_class_folders":
        (data / "train").mkdir(parents=True)
        (data / "val").mkdir()
    elif case == "no_images":
        (data / "train" / "a").mkdir(parents=True)
        (data / "val" / "a").mkdir(parents=True)
        (data / "train" / "a" / "notes.txt").write_text("not an image")
    elif case.startswith("empty_"):  # e.g. a class whose images were not copied yet
        make_folder(data, classes=("zero", "one", "two"))
        part, name = ("train", "two") if case == "empty_train_class" else ("val", "one")
        for image in (data / part / name).iterdir():
            image.unlink()
    elif case == "val_class_missing":
        make_folder(data, val_classes=("zero",))
    out = tmp_path / "out"
    argv = ["train", *TINY, "--data", str(data), "--epochs", "1", "--batch-size", "4", "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("biformer train: error: ") and message.format(data=data) in err and "Traceback" not in err
    assert not out.exists()


def test_non_writable_output(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["train", *DIGITS, "--epochs", "1", "--output", str(blocker / "out")]) == 2
    assert "cannot be created: a part of its path is a file" in capsys.readouterr().err
    assert main(["train", *DIGITS, "--epochs", "1", "--output", str(blocker)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["train", *DIGITS, "--epochs", "1", "--output", str(locked)]) == 2
        assert "cannot be written" in capsys.readouterr().err


@pytest.mark.slow
def test_checkpoint_for_another_model_or_class_count(trained, tmp_path, capsys):
    weights = str(trained / "last.safetensors")
    assert main(["eval", "--checkpoint", weights, "--model", "biformer_tiny"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "another model or number of classes" in err and "Traceback" not in err
    data = make_folder(tmp_path / "three", classes=("a", "b", "c"), per_class=2)
    assert main(["eval", "--checkpoint", weights, "--data", str(data)]) == 2
    assert "--data has 3 classes but the checkpoint has 10" in capsys.readouterr().err
    assert main(["predict", weights, "--checkpoint", str(tmp_path / "nope.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((trained / "last.safetensors").read_bytes()[:100_000])
    assert main(["eval", "--checkpoint", str(truncated)]) == 2
    assert "is not a readable safetensors file" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_of_an_original_layout_pth(trained, tmp_path, capsys):
    """A .pth in the original release's layout ({'model': state_dict}) evaluates like our checkpoint."""
    import timm

    from biformer.checkpoints import to_original_state_dict

    released = tmp_path / "nano_release.pth"
    model = timm.create_model("biformer_nano", num_classes=10)
    torch.save({"model": to_original_state_dict(load_file(trained / "last.safetensors"), model)}, released)
    # 10 classes: the release path has no class names, so eval checks the count only
    assert main(["eval", "--checkpoint", str(released), "--model", "biformer_nano", "--img-size", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"] == pytest.approx(read_metrics(trained)[-1]["val_top1"], abs=1e-9)


@pytest.mark.parametrize("argv,message", [
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a GPU"),
    (["--model", "no_such_model"], "--model 'no_such_model' is no model of any task (segmentation: sfpn_<backbone>"),
    (["--img-size", "16"], "--img-size must be at least 32 (BiFormer downsamples 32x), got 16"),
    (["--lr", "-1"], "--lr must be at least 0, got -1.0"),
    (["--workers", "-1"], "--workers must be at least 0, got -1"),
    (["--batch-size", "5000"], "exceeds the 1437 training images"),
    (["--model-kwargs", "attention"], "--model-kwargs 'attention': expected KEY=VALUE"),
    (["--scale", "0.9", "0.5"], "--scale takes MIN MAX with 0 < MIN <= MAX <= 1"),
    (["--scale", "0", "1"], "--scale takes MIN MAX with 0 < MIN <= MAX <= 1"),
    (["--hflip", "2"], "--hflip is a probability (0 to 1), got 2.0"),
])
def test_bad_options(tmp_path, capsys, argv, message):
    assert main(["train", *DIGITS, "--epochs", "1", "--output", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # checked before the output folder is created


def test_model_kwargs_refused_by_the_model(tmp_path, capsys):
    assert main(["train", *DIGITS, "--epochs", "1", "--output", str(tmp_path / "out"), "--model-kwargs", "colour=red"]) == 2
    assert "--model-kwargs colour=red: biformer_nano refused them" in capsys.readouterr().err


@pytest.mark.slow
def test_model_kwargs_shape_the_model_and_travel_with_its_weights(tmp_path):
    """A model trained with --model-kwargs comes back from its weights file as trained (grid attention,
    whose weights have BRA's keys: without the recorded arguments it would load into BRA layers)."""
    from biformer.models.mixers import GridAttention
    from biformer.tasks import restore

    out = tmp_path / "grid"
    assert main(["train", *DIGITS, "--epochs", "1", "--output", str(out), "--model-kwargs", "attention=grid",
                 "topks=2,2,2,-2"]) == 0
    restored = restore(out / "last.safetensors").model
    assert isinstance(restored.stages[0].blocks[0].attn, GridAttention) and restored.topks == (2, 2, 2, "global_input")
    assert TrainConfig(model_kwargs=["attention=grid", "topks=2,2,2,-2"]).model_arguments() == {
        "attention": "grid", "topks": (2, 2, 2, -2)}


def test_config_is_the_command_line():
    """Every TrainConfig field is a `biformer train` option with the field's default; built in code, it checks too."""
    assert config_from_args(build_parser().parse_args(["train"])) == TrainConfig()
    with pytest.raises(UserError, match="--epochs must be at least 1, got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(UserError, match="--amp must be one of none, auto, bf16, fp16, got 'fp32'"):
        TrainConfig(amp="fp32")
    resolved = resolve(TrainConfig()).config
    assert "output" not in resolved.run_options() and resolved.run_options()["lr"] == 2e-3
    assert resolved.sources["lr"] == "default" and resolve(TrainConfig(lr=1e-3)).config.sources["lr"] == "given"


def test_interrupted_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """An interrupted save leaves the previous file in place and no temporary file behind."""
    from biformer.checkpoints import weights as files

    target = tmp_path / "last.safetensors"
    target.write_bytes(b"previous")

    def failing_save(state, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        files.save_weights(target, torch.nn.Linear(2, 2), {"epoch": 1})
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


@pytest.mark.parametrize("data", ["digits", "folder"])
def test_the_crop_scale_and_flip_reach_the_training_transform(data, tmp_path):
    """--scale and --hflip replace the data set's own augmentation (digits: 0.75-1, no flips; folders: timm's
    0.08-1 and flips half the time)."""
    from torchvision import transforms

    from biformer.config import TrainConfig
    from biformer.recipes import resolve
    from biformer.tasks.registry import task_for_model

    if data == "folder":
        for part in ("train", "val"):
            (tmp_path / part / "a").mkdir(parents=True)
            Image.new("RGB", (40, 40)).save(tmp_path / part / "a" / "0.png")
        data = str(tmp_path)
    task = task_for_model("biformer_nano")

    def augmentation(**options):
        config = resolve(TrainConfig(model="biformer_nano", data=data, **options)).config
        steps = task.training_splits(config, None).train.transform
        crop = next(step for step in steps.transforms if type(step).__name__.startswith("RandomResizedCrop"))
        flips = [step.p for step in steps.transforms if isinstance(step, transforms.RandomHorizontalFlip)]
        return crop.scale, flips

    own = augmentation()
    assert own == (((0.75, 1.0), []) if data == "digits" else ((0.08, 1.0), [0.5]))
    assert augmentation(scale=(0.6, 1.0), hflip=0.25) == ((0.6, 1.0), [0.25])
