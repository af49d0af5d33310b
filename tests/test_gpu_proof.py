"""tools/gpu_proof.py on a machine without CUDA: every section says so in its CSV and the script exits cleanly."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "gpu_proof.py"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_without_cuda_every_section_writes_a_skipped_row(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--budget-s", "120"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "gpu_proof.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    sections = ["tests", "syncs", "profile", "ops", "eager", "compiled"]
    assert [r["section"] for r in rows if r["metric"] == "skipped"] == sections
    assert all(r["note"] == "no CUDA device" for r in rows if r["metric"] == "skipped")
    assert [r["section"] for r in rows if r["metric"] == "section_s"] == sections


def test_a_spent_budget_skips_the_sections_left(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--budget-s", "1", "--sections", "ops"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "gpu_proof.csv", newline="")))
    assert [(r["section"], r["metric"], r["note"]) for r in rows] == [("ops", "not_run", "budget spent")]
