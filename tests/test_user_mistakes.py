"""What a user who makes a mistake (or brings unusual data) gets from the command line: a one-line error with
exit 2, a counted skip, or the right result; never a traceback, a silent wrong figure or a lost run.

Each test drives `biformer.cli.main` in-process and checks its exit status, its output and the files it
wrote; the numbers follow the list of defects that first showed each case.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from tiny_data import make_coco_folder, make_image_folder, make_mask_folder, read_metrics

from biformer.cli import main

# small splits (PNG images: the 16-bit case rewrites them in place), every validation image with objects
mask_folder = functools.partial(make_mask_folder, train=4, val=2, image_suffix=".png")
coco_folder = functools.partial(make_coco_folder, train=4, val=2, negative=False)

# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------

QUICK = ["--img-size", "64", "--no-tensorboard", "--warmup-epochs", "1", "--batch-size", "2", "--epochs", "1"]
SEGMENTATION = ["--model", "sfpn_biformer_nano", *QUICK]
RETINANET = ["--model", "retinanet_biformer_nano", *QUICK, "--lr", "1e-3"]
MASKRCNN = ["--model", "maskrcnn_biformer_nano", *QUICK, "--lr", "1e-3"]
CLASSIFIER = ["--model", "biformer_nano", "--img-size", "32", "--no-tensorboard", "--warmup-epochs", "1",
              "--batch-size", "2", "--epochs", "1"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `biformer ARGV` run in-process, as the real command line would end:
    SystemExit gives its code; an exception that escapes `main` is what a user sees as a traceback and exit 1
    (the traceback is appended to stderr, so that the assertion message shows it)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exit_:
        rc = exit_.code if isinstance(exit_.code, int) else 1
    except Exception:  # noqa: BLE001 - an uncaught exception is the defect being shown
        captured = capsys.readouterr()
        return 1, captured.out, captured.err + traceback.format_exc()
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> str:
    """Exit 2 and a single `biformer CMD: error: ...` line on stderr (notes before it aside) that contains
    every fragment; the error line."""
    assert rc == 2, f"expected exit 2 with a one-line error, got exit {rc}; stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if ": error: " in line]
    assert errors, err[-3000:]
    assert errors[0] == len(lines) - 1, f"the error is not one line:\n{err[-3000:]}"
    message = lines[-1]
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"
    return message


def png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# trained tiny models, shared by the tests of this module
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """(mask folder, run folder) of one epoch of sfpn_biformer_nano (classes background, square, bar)."""
    data = mask_folder(tmp_path_factory.mktemp("masks"))
    out = tmp_path_factory.mktemp("segrun")
    assert main(["train", *SEGMENTATION, "--data", str(data), "--output", str(out)]) == 0
    return data, out


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    """(COCO folder, run folder) of one epoch of retinanet_biformer_nano (classes square, bar)."""
    data = coco_folder(tmp_path_factory.mktemp("cocodata"))
    out = tmp_path_factory.mktemp("detrun")
    assert main(["train", *RETINANET, "--data", str(data), "--output", str(out)]) == 0
    return data, out


# ---------------------------------------------------------------------------------------------------------
# 1. a NaN validation metric
# ---------------------------------------------------------------------------------------------------------

def _check_nan_epoch_committed(capsys, argv: list, out: Path, metric: str) -> None:
    rc, stdout, err = cli(capsys, *argv, "--output", out)
    assert rc == 0, f"exit {rc}:\n{err[-2500:]}"
    assert (out / "last.state.pt").is_file() and (out / "last.safetensors").is_file()
    rows = read_metrics(out)
    assert [row["epoch"] for row in rows] == [1]
    assert rows[0][metric] is None or math.isnan(rows[0][metric])  # NaN (or JSON null), not a number
    rc, stdout, err = cli(capsys, *argv, "--output", out, "--resume")
    assert rc == 0 and "all 1 epochs were already done" in stdout, err[-2500:]


@pytest.mark.slow
def test_01_nan_val_miou_epoch_is_committed_and_resumable(tmp_path, capsys):
    """Validation masks that are all 255 (ignore): mIoU is NaN; the epoch must still be committed."""
    data = mask_folder(tmp_path / "data", val_ignored=True)
    _check_nan_epoch_committed(capsys, ["train", *SEGMENTATION, "--data", data], tmp_path / "run", "val_miou")


@pytest.mark.slow
def test_01_nan_val_box_ap_epoch_is_committed_and_resumable(tmp_path, capsys):
    """A COCO val split whose objects are all crowd: box AP is NaN; the epoch must still be committed."""
    def all_crowd(split, data):
        if split == "val":
            for annotation in data["annotations"]:
                annotation["iscrowd"] = 1

    data = coco_folder(tmp_path / "data", edit=all_crowd)
    _check_nan_epoch_committed(capsys, ["train", *RETINANET, "--data", data], tmp_path / "run", "val_bbox_ap")


# ---------------------------------------------------------------------------------------------------------
# 2. COCO val annotations without 'area' or 'id'
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("key", ["area", "id"])
def test_02_eval_refuses_val_annotations_without_area_or_id(det, tmp_path, capsys, key):
    def drop(split, data):
        del data["annotations"][0][key]

    data = coco_folder(tmp_path / "data", edit=drop)
    rc, out, err = cli(capsys, "eval", "--checkpoint", det[1] / "last.safetensors", "--data", data)
    assert_one_line_error(rc, err, "instances_val.json", repr(key))


@pytest.mark.slow
def test_02_train_refuses_val_annotations_without_area_before_training(tmp_path, capsys):
    def drop(split, data):
        if split == "val":
            del data["annotations"][0]["area"]

    data = coco_folder(tmp_path / "data", edit=drop)
    rc, out, err = cli(capsys, "train", *RETINANET, "--data", data, "--output", tmp_path / "run")
    assert_one_line_error(rc, err, "instances_val.json", "'area'")
    assert not (tmp_path / "run").exists()  # refused before --output is created (no epoch trained in vain)


# ---------------------------------------------------------------------------------------------------------
# 3. predict: same file name in two subfolders
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_03_predict_keeps_same_named_images_apart(seg, tmp_path, capsys):
    data, run = seg
    images = tmp_path / "images"
    for index, sub in enumerate(("a", "b")):
        (images / sub).mkdir(parents=True)
        shutil.copy(data / "images" / "val" / f"{index}.png", images / sub / "x.png")
    rc, out, err = cli(capsys, "predict", images, "--checkpoint", run / "last.safetensors", "--output", tmp_path / "pred")
    assert rc == 0, err[-2500:]
    overlays = sorted(tmp_path.joinpath("pred").rglob("*_overlay.png"))
    labels = sorted(tmp_path.joinpath("pred").rglob("*_labels.png"))
    assert len(overlays) == 2 and len(labels) == 2, f"one image's outputs overwrote the other's: {overlays}"


# ---------------------------------------------------------------------------------------------------------
# 4. 16-bit images
# ---------------------------------------------------------------------------------------------------------

def _sixteen_bit(image8: np.ndarray) -> np.ndarray:
    """The 16-bit grey image whose 8-bit scaling (value / 257) is `image8` (grey, uint8)."""
    return image8.astype(np.uint16) * 257


def _grey_scene(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grey = np.full((64, 64), 120, np.uint8) + rng.integers(0, 20, (64, 64), dtype=np.uint8)
    top, left = rng.integers(0, 40, 2)
    grey[top:top + 20, left:left + 20] = 250
    grey[30:36, :] = 10
    return grey


@pytest.mark.slow
def test_04_predict_scales_16_bit_png_to_8_bit(seg, tmp_path, capsys):
    """The overlay of a 16-bit PNG equals that of the same picture stored as 8-bit PNG (today: saturated)."""
    _, run = seg
    grey = _grey_scene(3)
    png(tmp_path / "in" / "eight.png", grey)
    sixteen = Image.fromarray(_sixteen_bit(grey))
    assert sixteen.mode in ("I;16", "I")
    sixteen.save(tmp_path / "in" / "sixteen.png")
    assert Image.open(tmp_path / "in" / "sixteen.png").mode in ("I;16", "I")
    rc, out, err = cli(capsys, "predict", tmp_path / "in", "--checkpoint", run / "last.safetensors",
                       "--output", tmp_path / "pred")
    assert rc == 0, err[-2500:]
    eight = np.asarray(Image.open(tmp_path / "pred" / "eight_overlay.png").convert("RGB"), np.float32)[:64]
    wide = np.asarray(Image.open(tmp_path / "pred" / "sixteen_overlay.png").convert("RGB"), np.float32)[:64]
    difference = np.abs(eight - wide).mean()
    assert difference < 3, f"16-bit input not scaled to 8 bit: its overlay differs by {difference:.1f} per channel"


@pytest.mark.slow
def test_04_eval_reads_16_bit_images_like_8_bit_ones(seg, tmp_path, capsys):
    """The data loaders: a validation split stored as 16-bit PNGs evaluates as the same split in 8 bit."""
    _, run = seg
    results = {}
    for bits in (8, 16):
        data = mask_folder(tmp_path / f"data{bits}", train=1, val=2)
        for index in range(2):
            grey = _grey_scene(index)
            mask = np.zeros((64, 64), np.uint8)
            mask[grey == 250], mask[grey == 10] = 1, 2
            png(data / "masks" / "val" / f"{index}.png", mask)
            (data / "images" / "val" / f"{index}.png").unlink()
            png(data / "images" / "val" / f"{index}.png", grey if bits == 8 else _sixteen_bit(grey))
        rc, out, err = cli(capsys, "eval", "--checkpoint", run / "last.safetensors", "--data", data, "--json")
        assert rc == 0, err[-2500:]
        results[bits] = json.loads(out.strip().splitlines()[-1])
    # the loss, unlike the (all-background) predictions of a one-epoch model, sees every input pixel
    assert results[16]["loss"] == pytest.approx(results[8]["loss"], rel=1e-3), "16-bit images read saturated"
    assert results[16]["confusion"] == results[8]["confusion"]


# ---------------------------------------------------------------------------------------------------------
# 5. sliding window with --stride larger than --window
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_05_slide_stride_larger_than_window_is_refused(seg, capsys):
    data, run = seg
    rc, out, err = cli(capsys, "eval", "--checkpoint", run / "last.safetensors", "--data", data,
                       "--mode", "slide", "--window", "16", "--stride", "24")
    assert "mIoU" not in out, f"an mIoU from uncovered (NaN) pixels was reported: {out[:200]}"
    assert_one_line_error(rc, err, "--stride")


# ---------------------------------------------------------------------------------------------------------
# 6. detection predict on an extreme aspect ratio
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_06_detection_predict_on_a_5000x20_image(det, tmp_path, capsys):
    """A result, a counted skip or a one-line error; never a RuntimeError traceback."""
    _, run = det
    image = png(tmp_path / "in" / "strip.png", np.full((20, 5000, 3), 128, np.uint8))
    rc, out, err = cli(capsys, "predict", image, "--checkpoint", run / "last.safetensors", "--output", tmp_path / "pred")
    assert "Traceback" not in err, err[-2500:]
    if rc == 0:
        assert (tmp_path / "pred" / "detections.json").is_file() and "strip" in out
    elif rc == 1:  # counted as skipped: the only image
        assert "strip.png" in err and "1 " in err and "skipped" in err, err
    else:
        assert_one_line_error(rc, err, "strip.png")


# ---------------------------------------------------------------------------------------------------------
# 7. malformed polygons
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("polygon", [[[]], [[1, 1]], [[1, 1, 5, 5]], [[1, 1, 9, 1, 9]]],
                         ids=["empty", "one-point", "four-coordinates", "odd-length"])
def test_07_bad_coco_shape_is_named_or_counted(tmp_path, capsys, polygon):
    """Training Mask R-CNN on a train split with one malformed polygon: a one-line error naming the file, the
    annotation and that its polygon is malformed, before any training; or a counted problem in a note."""
    def bad_polygon(split, data):
        if split == "train":
            data["annotations"][0]["segmentation"] = polygon

    data = coco_folder(tmp_path / "data", train=2, val=1, edit=bad_polygon)
    rc, out, err = cli(capsys, "train", *MASKRCNN, "--data", data, "--output", tmp_path / "run")
    if rc == 0:  # counted as a problem (and the annotation left out)
        notes = [line for line in err.splitlines() if line.startswith("note:") and "polygon" in line.lower()]
        assert notes, f"the malformed polygon {polygon} was accepted silently:\n{err[-2000:]}"
    else:
        assert_one_line_error(rc, err, "instances_train.json", "annotation id 1", "polygon")
        assert not (tmp_path / "run" / "last.state.pt").exists()


# ---------------------------------------------------------------------------------------------------------
# 8. predict --output that cannot be a folder
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", ["a-file", "inside-a-file", "unwritable"])
def test_08_predict_output_that_cannot_be_a_folder(seg, tmp_path, capsys, case):
    data, run = seg
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    if case == "a-file":
        output = blocker
    elif case == "inside-a-file":
        output = blocker / "pred"
    elif os.geteuid() == 0:  # root writes anywhere, except in /sys
        output = Path("/sys/biformer-defect-test/pred")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        output = locked / "pred"
    rc, out, err = cli(capsys, "predict", data / "images" / "val" / "0.png", "--checkpoint", run / "last.safetensors",
                       "--output", output)
    assert_one_line_error(rc, err, "--output")


# ---------------------------------------------------------------------------------------------------------
# 9. a UserError raised inside a DataLoader worker
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_09_user_error_in_a_worker_stays_one_line(seg, tmp_path, capsys):
    _, run = seg
    data = mask_folder(tmp_path / "data", train=1, val=2)
    mask = np.array(Image.open(data / "masks" / "val" / "1.png"))
    mask[5:9, 5:9] = 7  # no class: classes.txt lists 3
    png(data / "masks" / "val" / "1.png", mask)
    rc, out, err = cli(capsys, "eval", "--checkpoint", run / "last.safetensors", "--data", data, "--workers", "2")
    assert_one_line_error(rc, err, "has value(s) [7]", "1.png")
    assert "DataLoader worker" not in err


# ---------------------------------------------------------------------------------------------------------
# 10. eval's options and checkpoint/model mismatches
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("options,fragment", [
    (["--model", "retinanet_biformer_nano"], "segmentation"),
    (["--mode", "slide", "--stride", "0"], "--stride"),
    (["--batch-size", "0"], "--batch-size"),
    (["--workers", "-1"], "--workers"),
    (["--img-size", "-5"], "--img-size"),
    (["--mode", "slide", "--window", "0"], "--window"),
], ids=["retinanet-model", "stride-0", "batch-size-0", "workers-minus-1", "img-size-minus-5", "window-0"])
def test_10_eval_bad_options_with_a_segmentation_checkpoint(seg, capsys, options, fragment):
    data, run = seg
    rc, out, err = cli(capsys, "eval", "--checkpoint", run / "last.safetensors", "--data", data, *options)
    assert_one_line_error(rc, err, fragment)


@pytest.mark.slow
def test_10_eval_detection_checkpoint_with_a_segmentation_model_names_the_tasks(det, seg, capsys):
    mask_folder, _ = seg
    _, run = det
    rc, out, err = cli(capsys, "eval", "--checkpoint", run / "last.safetensors", "--model", "sfpn_biformer_nano",
                       "--data", mask_folder)
    message = assert_one_line_error(rc, err, "detection", "segmentation")
    assert "classes" not in message, message


# ---------------------------------------------------------------------------------------------------------
# 11. temporaries left by a SIGKILL during the state save
# ---------------------------------------------------------------------------------------------------------

KILL_DURING_TORCH_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    real_save = torch.save
    def save_then_die(obj, f, *args, **kwargs):  # killed while the state file is being written
        real_save(obj, f, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save_then_die
    from biformer.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_11_resume_removes_stale_temporaries(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["train", *CLASSIFIER, "--data", str(data), "--output", str(out)]
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_TORCH_SAVE, *argv], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert list(out.glob(".tmp-*")), "precondition: the kill left a temporary file"
    rc, stdout, err = cli(capsys, *argv, "--resume")
    assert rc == 0, err[-2500:]
    assert not list(out.glob(".tmp-*")), f"stale temporaries after a successful resume: {list(out.glob('.tmp-*'))}"


# ---------------------------------------------------------------------------------------------------------
# 12. --output=~/x
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_12_train_expands_tilde_in_output(tmp_path, capsys, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    data = make_image_folder(tmp_path / "data")
    rc, out, err = cli(capsys, "train", *CLASSIFIER, "--data", data, "--output=~/run")
    assert rc == 0, err[-2500:]
    assert not (cwd / "~").exists(), "a literal '~' folder was created in the working directory"
    assert (home / "run" / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_12_predict_expands_tilde_in_output(seg, tmp_path, capsys, monkeypatch):
    data, run = seg
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    rc, out, err = cli(capsys, "predict", data / "images" / "val" / "0.png", "--checkpoint", run / "last.safetensors",
                       "--output=~/pred")
    assert rc == 0, err[-2500:]
    assert not (cwd / "~").exists(), "a literal '~' folder was created in the working directory"
    assert (home / "pred" / "0_overlay.png").is_file()


# ---------------------------------------------------------------------------------------------------------
# 13. classes.txt
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_13_duplicate_class_names_are_refused(tmp_path, capsys):
    data = mask_folder(tmp_path / "data", classes="background\nsquare\nsquare\n")
    rc, out, err = cli(capsys, "train", *SEGMENTATION, "--data", data, "--output", tmp_path / "run")
    assert_one_line_error(rc, err, "classes.txt", "square")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_13_utf8_bom_is_not_part_of_the_first_class_name(seg, tmp_path, capsys):
    """classes.txt saved with a BOM (as Windows editors do) names the same classes as without one."""
    data, run = seg
    copy = mask_folder(tmp_path / "data", train=1, val=2, classes="\ufeffbackground\nsquare\nbar\n")
    assert (copy / "classes.txt").read_bytes().startswith(b"\xef\xbb\xbf")
    rc, out, err = cli(capsys, "eval", "--checkpoint", run / "last.safetensors", "--data", copy, "--json")
    assert rc == 0, f"the BOM made the first class differ: {err[-500:]}"


# ---------------------------------------------------------------------------------------------------------
# 14. the overlay legend on narrow images
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("width", [64, 24])
def test_14_overlay_legend_is_not_clipped(seg, tmp_path, capsys, width):
    """Every legend entry (swatch at x 2..12, text from x 16) fits in the picture: it is at least 16 px + the
    text's width (PIL's default font, which the legend uses) wide, for each class present in the labels."""
    _, run = seg
    classes = ["background", "square", "bar"]
    picture = np.full((64, width, 3), 120, np.uint8)
    picture[20:40, : width // 2] = 250
    image = png(tmp_path / "in" / "narrow.png", picture)
    rc, out, err = cli(capsys, "predict", image, "--checkpoint", run / "last.safetensors", "--output", tmp_path / "pred")
    assert rc == 0, err[-2500:]
    overlay = Image.open(tmp_path / "pred" / "narrow_overlay.png")
    present = [classes[i] for i in np.unique(np.array(Image.open(tmp_path / "pred" / "narrow_labels.png")))]
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    needed = {name: 16 + math.ceil(draw.textlength(name)) for name in present}
    clipped = {name: px for name, px in needed.items() if px > overlay.width}
    assert not clipped, f"legend text clipped in a {overlay.width} px wide overlay: needs {clipped}"


# ---------------------------------------------------------------------------------------------------------
# 15. misleading messages
# ---------------------------------------------------------------------------------------------------------

def test_15_detection_layout_given_to_a_segmentation_model(tmp_path, capsys):
    data = coco_folder(tmp_path / "data")
    rc, out, err = cli(capsys, "train", *SEGMENTATION, "--data", data, "--output", tmp_path / "run")
    message = assert_one_line_error(rc, err)
    assert "ADE20K" not in message and "ADEChallengeData2016" not in message, message
    assert "COCO" in message, message  # says it is a detection (COCO) folder


@pytest.mark.slow
def test_15_val_json_without_images_says_so(det, tmp_path, capsys):
    def no_images(split, data):
        if split == "val":
            data["images"], data["annotations"] = [], []

    data = coco_folder(tmp_path / "data", edit=no_images)
    rc, out, err = cli(capsys, "eval", "--checkpoint", det[1] / "last.safetensors", "--data", data)
    message = assert_one_line_error(rc, err, "instances_val.json")
    assert "could be read" not in message, message  # no image is unreadable: the file lists none


@pytest.mark.slow
def test_15_eval_on_all_ignored_val_has_no_zero_loss(seg, tmp_path, capsys):
    _, run = seg
    data = mask_folder(tmp_path / "data", train=1, val=2, val_ignored=True)
    rc, out, err = cli(capsys, "eval", "--checkpoint", run / "last.safetensors", "--data", data)
    assert "val_loss 0.0000" not in out, out  # no annotated pixel: the loss is undefined, not 0
    rc, out, err = cli(capsys, "eval", "--checkpoint", run / "last.safetensors", "--data", data, "--json")
    loss = json.loads(out.strip().splitlines()[-1])["loss"]
    assert loss is None or math.isnan(loss), loss


@pytest.mark.slow
def test_15_crowd_note_for_the_val_split_does_not_mention_training(det, tmp_path, capsys):
    def one_crowd(split, data):
        data["annotations"][0]["iscrowd"] = 1

    data = coco_folder(tmp_path / "data", edit=one_crowd)
    rc, out, err = cli(capsys, "eval", "--checkpoint", det[1] / "last.safetensors", "--data", data)
    assert rc == 0, err[-2500:]
    notes = [line for line in err.splitlines() if "crowd" in line]
    assert notes, err
    assert not any("training" in line for line in notes), notes
