"""`biformer train/eval/predict`: metrics, exact resume after SIGKILL, torchrun with gloo, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from biformer.cli import main
from biformer.training.engine import KILL_AT_STEP_ENV

# nano on the digits at 32 px: one epoch is ~22 steps of 64 images, about a second on 2 cores
QUICK = ["--data", "digits", "--model", "biformer_nano", "--img-size", "32", "--no-tensorboard", "--warmup-epochs", "1"]
COMPARED = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr")  # not the timings


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "biformer", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted 2-epoch run (the reference for the resume test), run in-process."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(["train", *QUICK, "--epochs", "2", "--output", str(out)]) == 0
    return out


def test_metrics_and_checkpoints_written(trained, capsys):
    rows = read_metrics(trained)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "val_loss", "val_top1", "val_top5"):
        assert all(isinstance(r[key], float) for r in rows)
    assert rows[-1]["val_top1"] > 50  # two epochs already learn the digits
    assert sorted(p.name for p in trained.iterdir()) == ["best.safetensors", "last.safetensors", "last.state.pt", "metrics.jsonl"]


def test_eval_reproduces_training_accuracy(trained, capsys):
    assert main(["eval", "--checkpoint", str(trained / "last.safetensors"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    last = read_metrics(trained)[-1]
    assert result["top1"] == pytest.approx(last["val_top1"], abs=1e-9)
    assert result["loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    assert result["count"] == 360


def test_resume_after_sigkill_is_exact(trained, tmp_path):
    out = tmp_path / "killed"
    killed = run_cli("train", *QUICK, "--epochs", "2", "--output", str(out), env={KILL_AT_STEP_ENV: "30"})  # epoch 2
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [r["epoch"] for r in read_metrics(out)] == [1]
    resumed = run_cli("train", *QUICK, "--epochs", "2", "--output", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing at epoch 2" in resumed.stdout
    expected, got = load_file(trained / "last.safetensors"), load_file(out / "last.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    strip = lambda rows: [{k: r[k] for k in COMPARED} for r in rows]  # noqa: E731
    assert strip(read_metrics(out)) == strip(read_metrics(trained))
    assert not list(out.glob(".*tmp*"))


def test_torchrun_two_ranks_gloo(tmp_path):
    out, shards = tmp_path / "ddp", tmp_path / "shards"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m", "biformer",
         "train", *QUICK, "--epochs", "1", "--batch-size", "32", "--output", str(out), "--record-shards", str(shards)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((shards / f"rank{r}.json").read_text()) for r in (0, 1)]
    first, second = (set(r["indices"]["1"]) for r in ranks)
    assert first and second and not first & second  # disjoint shards
    assert len(first) == len(second) == 22 * 32  # 1437 images: 718 per rank, 22 full batches of 32
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert sorted(p.name for p in out.iterdir()) == ["best.safetensors", "last.safetensors", "last.state.pt", "metrics.jsonl"]
    assert len(read_metrics(out)) == 1
    assert result.stdout.count("final validation top-1") == 1


# ---------------------------------------------------------------------------------------------
# image folders and bad input
# ---------------------------------------------------------------------------------------------

def make_folder(root: Path, classes=("zero", "one"), per_class=6, val_classes=None) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for part, names in (("train", classes), ("val", val_classes or classes)):
        for label, name in enumerate(names):
            (root / part / name).mkdir(parents=True, exist_ok=True)
            picks = np.flatnonzero(digits.target == label)[:per_class]
            for i in picks:
                pixels = np.clip(digits.images[i] * 16, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).resize((40, 40)).save(root / part / name / f"{i}.png")
    return root


def test_image_folder_with_an_unreadable_image(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    (data / "train" / "one" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    assert main(["train", *QUICK, "--data", str(data), "--epochs", "1", "--batch-size", "4", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert "1 unreadable image(s) were skipped" in captured.err
    assert len(read_metrics(out)) == 1
    assert main(["predict", str(data / "val"), "--checkpoint", str(out / "last.safetensors"), "--json", "--topk", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 12 and {p["predictions"][0]["class"] for p in lines} <= {"zero", "one"}


@pytest.mark.parametrize("case,message", [
    ("missing", "neither 'digits' nor an existing folder"),
    ("empty", "has no train/ sub-folder"),
    ("no_images", "holds no readable images"),
    ("val_class_missing", "are missing from"),
])
def test_bad_data_folders(tmp_path, capsys, case, message):
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
    elif case == "no_images":
        (data / "train" / "a").mkdir(parents=True)
        (data / "val" / "a").mkdir(parents=True)
    elif case == "val_class_missing":
        make_folder(data, val_classes=("zero",))
    code = main(["train", *QUICK, "--data", str(data), "--epochs", "1", "--output", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_non_writable_output(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["train", *QUICK, "--epochs", "1", "--output", str(blocker / "out")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_checkpoint_for_another_model_or_class_count(trained, tmp_path, capsys):
    weights = str(trained / "last.safetensors")
    assert main(["eval", "--checkpoint", weights, "--model", "biformer_tiny"]) == 2
    assert "does not fit" in capsys.readouterr().err
    data = make_folder(tmp_path / "three", classes=("a", "b", "c"), per_class=2)
    assert main(["eval", "--checkpoint", weights, "--data", str(data)]) == 2
    assert "--data has 3 classes but the checkpoint has 10" in capsys.readouterr().err
    assert main(["predict", weights, "--checkpoint", str(tmp_path / "nope.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_kill_while_saving_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """An interrupted save leaves the previous file in place and no temporary file behind."""
    from biformer.training import checkpoint

    target = tmp_path / "last.safetensors"
    target.write_bytes(b"previous")

    def failing_save(state, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_weights(target, torch.nn.Linear(2, 2), {"epoch": 1})
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]
