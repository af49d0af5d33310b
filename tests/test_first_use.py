"""What a new user met on a fresh clone: data loss in `convert`, metadata lost on the way, fine-tuning with another
checkpoint's statistics, exported files given as checkpoints, the start-up table and the run folder of a dry run,
a warm-up longer than the run, a predict run with nothing predicted. Each test failed before its fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from biformer.checkpoints.weights import read_metadata
from biformer.cli import main
from biformer.data.digits import digit_image

DIGITS = ["--data", "digits", "--model", "biformer_nano", "--img-size", "32", "--no-tensorboard"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """best.safetensors of a one-epoch biformer_nano on the digits."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *DIGITS, "--epochs", "1", "--warmup-epochs", "0", "--output", str(out)]) == 0
    return out / "best.safetensors"


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"biformer {command}: error:") and "Traceback" not in err and err.count("\n") == 1, err
    return err


# 1. convert onto its own input

@pytest.mark.slow
def test_convert_refuses_to_write_over_its_input(trained, tmp_path, capsys):
    copy = tmp_path / "weights.safetensors"
    copy.write_bytes(trained.read_bytes())
    link = tmp_path / "link.safetensors"
    link.symlink_to(copy)
    for output in (copy, link):
        assert main(["convert", str(copy), str(output)]) == 2
        assert "is the input file" in one_line_error(capsys, "convert")
    assert copy.read_bytes() == trained.read_bytes()


# 3. convert keeps what the trainer recorded

@pytest.mark.slow
def test_convert_keeps_the_training_metadata_both_ways(trained, tmp_path, capsys):
    release, back = tmp_path / "release.pth", tmp_path / "back.safetensors"
    assert main(["convert", str(trained), str(release)]) == 0
    assert main(["convert", str(release), str(back)]) == 0
    source = read_metadata(trained)
    for converted in (release, back):
        metadata = read_metadata(converted)
        for key in ("classes", "img_size", "mean", "std", "crop_pct", "task", "model"):
            assert metadata[key] == source[key], (converted, key)
    assert any(key.startswith("downsample_layers") for key in torch.load(release, weights_only=True)["model"])
    image = tmp_path / "seven.png"
    digit_image(7).resize((32, 32)).save(image)
    capsys.readouterr()
    answers = []
    for weights in (trained, release, back):
        assert main(["predict", str(image), "--checkpoint", str(weights), "--json"]) == 0
        answers.append(json.loads(capsys.readouterr().out)["predictions"])
    assert answers[0] == answers[1] == answers[2]  # the same preprocessing, so the same probabilities


# 9. an exported model given where a checkpoint belongs

def test_exported_models_are_named_as_such(tmp_path, capsys):
    image = tmp_path / "x.png"
    digit_image(1).save(image)
    scripted = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    onnx, program = tmp_path / "model.onnx", tmp_path / "model.pt2"
    onnx.write_bytes(b"\x08\x07")  # the kind is told by the name: no model is read
    program.write_bytes(b"PK")
    for path, kind in ((onnx, "an ONNX model"), (program, "a torch.export program"), (scripted, "a TorchScript")):
        for argv in (["predict", str(image), "--checkpoint", str(path)], ["predict", str(image), "--checkpoint",
                     str(path), "--model", "biformer_nano"], ["eval", "--checkpoint", str(path)]):
            assert main(argv) == 2
            assert kind in one_line_error(capsys, argv[0]), argv
