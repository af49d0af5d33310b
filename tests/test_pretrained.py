"""`biformer train --pretrained FILE`: a classifier starts from another classifier's weights (ours, the original
release's layout, timm's or PyTorch's file) with its head re-initialized for its own classes; a dense model's
backbone starts from a classifier's; what was used is printed and recorded; files that do not fit are refused
before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_data import make_mask_folder

from biformer.checkpoints.loading import load_pretrained_classifier
from biformer.checkpoints.original import to_original_state_dict
from biformer.checkpoints.weights import read_metadata
from biformer.cli import main

TINY = ["--img-size", "32", "--no-tensorboard", "--warmup-epochs", "0", "--epochs", "1", "--batch-size", "4"]


def make_class_folder(root: Path, classes: tuple[str, ...] = ("dark", "mid", "bright"), per_class: int = 4) -> Path:
    """root/{train,val}/<class>/<n>.png: 40x40 noisy grey images, one brightness per class."""
    rng = np.random.default_rng(0)
    for part in ("train", "val"):
        for level, name in enumerate(classes):
            (root / part / name).mkdir(parents=True)
            for index in range(per_class):
                pixels = 40 + 80 * level + rng.integers(0, 30, (40, 40, 3))
                Image.fromarray(pixels.astype(np.uint8)).save(root / part / name / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory) -> Path:
    """A biformer_nano trained for one epoch on the bundled digits (10 classes)."""
    out = tmp_path_factory.mktemp("digits")
    assert main(["train", "--model", "biformer_nano", "--data", "digits", *TINY, "--batch-size", "64",
                 "--output", str(out)]) == 0
    return out / "best.safetensors"


@pytest.mark.slow
def test_a_classifier_fine_tunes_from_another_class_count(digits_classifier, tmp_path, capsys):
    data = make_class_folder(tmp_path / "data")
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--model", "biformer_nano", "--data", str(data), *TINY, "--lr", "0", "--min-lr", "0",
                 "--pretrained", str(digits_classifier), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"--pretrained: {digits_classifier} (classification checkpoint)" in printed
    assert "not used: head (2)" in printed and "at their initial values" in printed
    # with lr 0 the trained parameters are the file's (BatchNorm statistics move in training), but for the head,
    # which has 3 classes now
    source, trained = load_file(digits_classifier), load_file(out / "last.safetensors")
    assert trained["head.weight"].shape == (3, source["head.weight"].shape[1])
    parameters = [name for name, _ in timm.create_model("biformer_nano").named_parameters()
                  if not name.startswith("head.")]
    assert parameters and all(torch.equal(trained[name], source[name]) for name in parameters)
    recorded = read_metadata(out / "last.safetensors")["pretrained"]
    assert recorded["path"] == str(digits_classifier) and recorded["initial"] == ["head"]
    assert recorded["loaded"] == len(source) - 2 and recorded["unused"] == {"head": 2}


def test_a_head_for_other_class_names_starts_afresh_even_at_the_same_count(tmp_path):
    """Ten digits are no start for ten other classes: a head is kept only for the classes its file records."""
    from biformer.checkpoints.weights import save_weights

    digits = [str(digit) for digit in range(10)]
    source = timm.create_model("biformer_nano", num_classes=10)
    with torch.no_grad():
        source.head.weight.fill_(0.5)  # unlike any initialization
    save_weights(tmp_path / "digits.safetensors", source, {"model": "biformer_nano", "classes": digits})
    moving = [f"{digit}-{direction}" for digit in range(5) for direction in ("left", "right")]
    for classes, kept in ((digits, True), (moving, False), (None, True)):
        model = timm.create_model("biformer_nano", num_classes=10)
        report = load_pretrained_classifier(model, tmp_path / "digits.safetensors", classes)
        assert torch.equal(model.head.weight, source.head.weight) is kept
        assert report.initial == ([] if kept else ["head"])
        assert torch.equal(model.stem[0].weight, source.stem[0].weight)
    moved = load_pretrained_classifier(timm.create_model("biformer_nano", num_classes=10),
                                       tmp_path / "digits.safetensors", moving)
    assert moved.why_initial == ("the file's classifier is for other classes (0, 1, 2, ..., not 0-left, 0-right, "
                                 "1-left, ...)")
    assert moved.unused == {"head": 2} and moved.loaded == len(source.state_dict()) - 2


def test_the_original_layout_and_timm_files_load_as_pretrained(tmp_path):
    """A release-layout file (as the original code saves it, wrapped in "model") and a timm classifier's
    checkpoint wrapped in "state_dict" both fill every tensor but the head."""
    source = timm.create_model("biformer_nano", num_classes=1000)
    release = tmp_path / "release.pth"
    torch.save({"model": to_original_state_dict(source.state_dict(), source)}, release)
    model = timm.create_model("biformer_nano", num_classes=5)
    report = load_pretrained_classifier(model, release)
    assert report.initial == ["head"] and report.unused == {"head": 2}
    assert torch.equal(model.stem[0].weight, source.stem[0].weight)

    resnet = timm.create_model("resnet18", num_classes=1000)
    wrapped = tmp_path / "resnet18.pth"
    torch.save({"state_dict": resnet.state_dict(), "epoch": 3}, wrapped)
    target = timm.create_model("resnet18", num_classes=1000)
    report = load_pretrained_classifier(target, wrapped)
    assert report.initial == [] and report.unused == {} and report.loaded == len(resnet.state_dict())
    assert torch.equal(target.fc.weight, resnet.fc.weight)  # the same class count: the head is kept too


@pytest.mark.slow
def test_a_dense_models_backbone_starts_from_a_classifier(digits_classifier, tmp_path, capsys):
    data = make_mask_folder(tmp_path / "masks", train=4, val=2)
    out = tmp_path / "seg"
    capsys.readouterr()
    assert main(["train", "--model", "sfpn_biformer_nano", "--data", str(data), *TINY, "--img-size", "64",
                 "--batch-size", "2", "--pretrained", str(digits_classifier), "--output", str(out)]) == 0
    assert "--pretrained: " in capsys.readouterr().out
    recorded = read_metadata(out / "last.safetensors")["pretrained"]
    assert recorded["kind"] == "classification checkpoint" and set(recorded["unused"]) == {"head", "norm"}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["another-architecture", "truncated", "missing", "not-weights"])
def test_files_that_do_not_fit_are_refused_before_the_output_exists(digits_classifier, tmp_path, capsys, case):
    path = tmp_path / "weights.pth"
    if case == "another-architecture":
        torch.save(timm.create_model("resnet18").state_dict(), path)
    elif case == "truncated":
        path = tmp_path / "weights.safetensors"
        path.write_bytes(digits_classifier.read_bytes()[:5000])
    elif case == "not-weights":
        path.write_text(json.dumps({"not": "weights"}))
    out = tmp_path / "run"
    assert main(["train", "--model", "biformer_nano", "--data", "digits", *TINY, "--pretrained", str(path),
                 "--output", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("biformer train: error: --pretrained ") and str(path) in error[0]
    assert not out.exists()
