"""`torchrun --nproc_per_node=2` training with gloo on CPU: disjoint shards, one model, one set of files."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from biformer.cli import main

HOOKED_TRAIN = Path(__file__).with_name("hooked_train.py")  # `biformer train` with test callbacks
QUICK = ["--data", "digits", "--model", "biformer_nano", "--img-size", "32", "--no-tensorboard", "--warmup-epochs", "1"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_gloo(tmp_path, capsys):
    out, shards = tmp_path / "ddp", tmp_path / "shards"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(HOOKED_TRAIN), "--record-shards", str(shards), *QUICK, "--epochs", "1", "--batch-size", "32",
         "--sync-bn", "--device", "cpu", "--output", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((shards / f"rank{r}.json").read_text()) for r in (0, 1)]
    first, second = (set(r["indices"]["1"]) for r in ranks)
    assert not first & second  # disjoint shards
    assert len(first) == len(second) == 22 * 32  # 1437 images: 718 per rank, 22 full batches of 32
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # gradients and BatchNorm statistics synced
    assert sorted(p.name for p in out.iterdir()) == ["best.safetensors", "config.json", "last.safetensors",
                                                     "last.state.pt", "metrics.jsonl", "schedule.csv"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert result.stdout.count("final validation top-1") == 1
    assert "--sync-bn is ignored on CPU" in result.stderr
    # the depthwise weights' gradients come channels-last: DDP must not copy (and warn about) them
    assert "Grad strides do not match bucket view strides" not in result.stderr

    # the metrics were reduced over both ranks' validation shards: one process on the whole split agrees
    assert main(["eval", "--checkpoint", str(out / "last.safetensors"), "--json", "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["count"] == 360
    assert evaluated["top1"] == pytest.approx(rows[0]["val_top1"], abs=1e-9)
    assert evaluated["loss"] == pytest.approx(rows[0]["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_torchrun_detection_gathers_every_validation_image_once(tmp_path, capsys):
    """3 validation images on 2 ranks (shards of 2 and 1): COCO's AP of the detections gathered from both ranks
    equals one process's on the whole split."""
    from test_detection_train import make_coco_folder

    data, out = make_coco_folder(tmp_path / "coco"), tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "biformer", "train", "--model", "retinanet_biformer_nano", "--data", str(data), "--img-size", "64",
         "--epochs", "1", "--batch-size", "1", "--lr", "1e-3", "--warmup-epochs", "1", "--no-tensorboard",
         "--device", "cpu", "--output", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    row, = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert result.stdout.count("final validation box AP") == 1
    assert main(["eval", "--checkpoint", str(out / "last.safetensors"), "--data", str(data), "--json",
                 "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["count"] == 3
    for key in ("bbox_ap", "bbox_ap50", "bbox_ap75"):
        assert evaluated[key] == pytest.approx(row[f"val_{key}"], abs=1e-9)
