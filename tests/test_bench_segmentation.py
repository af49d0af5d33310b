"""`biformer bench segmentation`: tiny cases measured in child processes, the default cases, and bad input."""
import csv
import sys

import pytest

from biformer.benchmarks.segmentation import (
    INFERENCE_INPUT,
    INFERENCE_MODEL,
    ORIGINAL,
    TRAINING_MODEL,
    SegmentationCase,
    default_cases,
)
from biformer.cli import main

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def test_tiny_cases_in_child_processes(tmp_path, capsys):
    path = tmp_path / "dense.csv"
    assert main(["bench", "segmentation", "--case", "inference", "--model", "sfpn_biformer_nano", "--input", "1,64,64",
                 "--threads", "1", "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert "peak_rss_mb" in out and "over_loaded_mb" in out and "sfpn_biformer_nano" in out and "1x3x64x64" in out
    row, = csv.DictReader(path.open())
    assert row["case"] == "inference" and row["backend"] == "auto"
    loaded, peak, over = (float(row[c]) for c in ("loaded_mb", "peak_rss_mb", "over_loaded_mb"))
    assert 100 < loaded < peak and over == pytest.approx(peak - loaded) and over > 0
    assert row["target"] == "" and row["meets"] == ""  # the targets are for the acceptance cases only


@pytest.mark.slow
def test_training_case_runs_ours_and_the_original(tmp_path, capsys):
    path = tmp_path / "dense.csv"
    assert main(["bench", "segmentation", "--case", "training", "--model", "biformer_nano", "--input", "2,64,64",
                 "--threads", "1", "--csv", str(path)]) == 0
    rows = list(csv.DictReader(path.open()))
    assert [row["backend"] for row in rows] == ["auto", ORIGINAL]
    assert all(float(row["over_loaded_mb"]) > 0 for row in rows)
    assert "gather algorithm" in capsys.readouterr().out


def test_default_cases_and_their_targets():
    inference, ours, original = default_cases()
    assert (inference.case, inference.model, inference.input, inference.classes) == ("inference", INFERENCE_MODEL,
                                                                                      INFERENCE_INPUT, 19)
    assert (ours.model, ours.input, ours.n_win, ours.backend) == (TRAINING_MODEL, (2, 3, 600, 500), 7, None)
    assert original.backend == ORIGINAL and original.target_mb is None
    assert inference.target_mb == ("peak_rss_mb", pytest.approx(2.5e9 / 2**20))
    assert ours.target_mb == ("over_loaded_mb", pytest.approx(2.2e9 / 2**20))
    assert SegmentationCase("inference", "sfpn_biformer_nano", (1, 3, 64, 64)).target_mb is None
    assert [case.model for case in default_cases("training", "biformer_tiny")] == ["biformer_tiny"] * 2


@pytest.mark.parametrize("argv, message", [
    (["--model", "biformer_tiny"], "add --case inference or --case training"),
    (["--case", "inference", "--model", "biformer_tiny"], "no segmentation model"),
    (["--case", "training", "--model", "upernet_biformer_tiny"], "no BiFormer variant"),
    (["--case", "inference", "--input", "1,100,64"], "multiples of 32"),
    (["--case", "training", "--input", "1,64"], "three integers"),
    (["--threads", "0"], "--threads"),
])
def test_bad_input(argv, message, capsys):
    assert main(["bench", "segmentation", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("biformer bench: error:") and message in err
