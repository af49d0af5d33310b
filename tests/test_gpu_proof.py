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
    with open(tmp_path / "gpu_proof.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["section"] == "ops"]  # a CUDA machine adds a device row
    assert [(r["metric"], r["note"]) for r in rows] == [("not_run", "budget spent")]


def test_a_section_past_its_cap_is_killed_with_its_children():
    import importlib.util
    import time

    spec = importlib.util.spec_from_file_location("gpu_proof", SCRIPT)
    proof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proof)
    started = time.monotonic()
    # a shell whose child sleeps: both must be gone when the cap ends the wait
    assert proof._run_capped(["bash", "-c", "sleep 30 & wait"], 1) is None
    assert time.monotonic() - started < 10
    assert proof._run_capped([sys.executable, "-c", "pass"], 30) == 0
