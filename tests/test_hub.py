"""`biformer export --format timm FOLDER`: a trained classifier as a folder in timm's hub format, which
`timm.create_model("local-dir:FOLDER", pretrained=True)` rebuilds in a fresh process (only timm and biformer
imported) to predict what `biformer predict` predicts on the source file; its model card states the file's figures;
bad input gets one line and leaves nothing behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from test_task_inference import weights_file
from test_user_mistakes import assert_one_line_error, cli

from biformer.checkpoints.weights import read_metadata
from biformer.cli import main
from biformer.data.digits import load_digits_split

pytest.importorskip("huggingface_hub", reason="timm's hub format needs huggingface_hub")

# run in a fresh process: what a user of the folder has (timm, biformer for the architecture, PIL for the images)
FRESH_PREDICT = """
import json, sys
import biformer, timm, torch
from PIL import Image
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
names = model.pretrained_cfg["label_names"]
with torch.no_grad():
    for path in sys.argv[2:]:
        logits = model(transform(Image.open(path).convert("RGB"))[None])
        print(json.dumps({"image": path, "class": names[int(logits.argmax())]}))
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """biformer_nano trained for one epoch on the bundled digits at 32 px."""
    out = tmp_path_factory.mktemp("digits")
    assert main(["train", "--model", "biformer_nano", "--data", "digits", "--img-size", "32", "--epochs", "1",
                 "--batch-size", "64", "--warmup-epochs", "0", "--no-tensorboard", "--output", str(out)]) == 0
    return out / "best.safetensors"


def test_a_hub_folder_predicts_as_its_source_in_a_fresh_process(trained, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for index, image in enumerate(load_digits_split()[2][:20]):  # 20 validation digits
        image.save(images / f"{index:02d}.png")
    rc, out, err = cli(capsys, "export", tmp_path / "hub", "--format", "timm", "--checkpoint", trained)
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "hub")) == ["README.md", "config.json", "model.safetensors"]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]
    rc, out, err = cli(capsys, "predict", "--checkpoint", trained, "--json", "--topk", "1", images)
    assert rc == 0, err
    expected = {Path(row["image"]).name: row["predictions"][0]["class"] for row in map(json.loads, out.splitlines())}
    fresh = subprocess.run([sys.executable, "-c", FRESH_PREDICT, str(tmp_path / "hub"),
                            *sorted(str(path) for path in images.iterdir())],
                           capture_output=True, text=True, timeout=300, check=True)
    got = {Path(row["image"]).name: row["class"] for row in map(json.loads, fresh.stdout.splitlines())}
    assert len(expected) == 20 and got == expected


def test_the_model_card_states_the_files_figures(trained, tmp_path, capsys):
    rc, _, err = cli(capsys, "export", tmp_path / "hub", "--format", "timm", "--checkpoint", trained,
                     "--license", "cc-by-4.0")
    assert rc == 0, err
    card = (tmp_path / "hub" / "README.md").read_text()
    recorded = read_metadata(trained)
    parameters = sum(p.numel() for p in timm.create_model("biformer_nano", num_classes=10).parameters())
    assert f"| parameters | {parameters / 1e6:.2f} M |" in card
    assert f"| validation | val_top1 {recorded['val_top1']:.2f} after epoch {recorded['epoch']} |" in card
    assert "| training data | digits |" in card and "| GMACs at 32x32 (computed) |" in card
    assert "license: cc-by-4.0" in card and "| classes | 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 |" in card
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["architecture"] == "biformer_nano" and config["label_names"] == [str(d) for d in range(10)]
    assert config["pretrained_cfg"]["mean"] == recorded["mean"] and config["pretrained_cfg"]["input_size"] == [3, 32, 32]


@pytest.mark.parametrize("case", ["unknown_format", "detector", "inside_a_file", "folder_with_files", "traced_flag"])
def test_bad_hub_exports_are_refused_in_one_line_and_leave_nothing(case, tmp_path, capsys):
    classifier = weights_file(tmp_path, "biformer_nano")
    target, args, fragments = tmp_path / "hub", ["--checkpoint", classifier, "--format", "timm"], []
    if case == "unknown_format":
        args[-1], fragments = "tflite", ["invalid choice: 'tflite'"]
    elif case == "detector":
        args[1], fragments = weights_file(tmp_path, "fcos_biformer_nano"), ["hub format holds image classifiers",
                                                                            "detection model"]
    elif case == "inside_a_file":
        (tmp_path / "file").write_text("")
        target, fragments = tmp_path / "file" / "hub", ["lies inside the file"]
    elif case == "folder_with_files":
        target.mkdir()
        (target / "mine.txt").write_text("keep")
        fragments = ["already holds files"]
    else:
        args, fragments = [*args, "--dynamic"], ["--dynamic", "leave it out"]
    before = sorted(os.listdir(tmp_path))
    assert_one_line_error(*cli(capsys, "export", target, *args)[::2], *fragments)
    assert sorted(os.listdir(tmp_path)) == before  # no folder, no temporary one
    if case == "folder_with_files":
        assert os.listdir(target) == ["mine.txt"]
