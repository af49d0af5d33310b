"""`biformer bench yolo`: YOLO detectors with and without BRA, trained from scratch on digit-scenes on this CPU.

Every model gets the same command and budget: `biformer yolo train model=<name> data=digit-scenes` with the shared
settings below and one seed per run, each run in its own process (ultralytics' defaults for everything else). The
table gives each model's mAP50 and mAP50-95 of its last epoch (median and range over the seeds), its parameters,
its GFLOPs at 640x640 (2 x the multiply-adds that `biformer.analysis.flops` counts, attention included, on the
fused model; ultralytics' own count, by module hooks, leaves attention out), its CPU latency at 640x640, batch 1
(median and range of interleaved rounds), and the median seconds a run took (ultralytics' clock: training and
each epoch's validation).

A finished run (its results.csv holds every epoch) is read back, not trained again: an interrupted benchmark,
run again with the same output folder, goes on where it stopped.
"""
from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..measure import interleaved_seconds, median_and_range_ms
from ..progress import progress

DEFAULT_MODELS = ("yolov8n.yaml", "yolov8n-bra.yaml", "yolo11n.yaml", "yolo11n-bra-neck.yaml")
COLUMNS = ("model", "mAP50", "mAP50_range", "mAP50-95", "mAP50-95_range", "params_M", "GFLOPs_640", "cpu_ms_640",
           "cpu_ms_range", "train_s")


def train_command(model: str, seed: int, epochs: int, img_size: int, batch: int, folder: Path) -> list[str]:
    """The one command every model trains with (only the model and the seed differ)."""
    return [sys.executable, "-m", "biformer", "yolo", "train", f"model={model}", "data=digit-scenes",
            f"epochs={epochs}", f"imgsz={img_size}", f"batch={batch}", f"seed={seed}", "workers=0", "plots=False",
            "device=cpu", f"project={folder}", f"name={run_name(model, seed)}", "exist_ok=True"]


def run_name(model: str, seed: int) -> str:
    return f"{Path(model).stem}-seed{seed}"


def _last_epoch(results: Path, epochs: int) -> dict[str, float] | None:
    """The last row of a finished run's results.csv (None if the run did not finish)."""
    if not results.is_file():
        return None
    with results.open(newline="") as handle:
        rows = [{key.strip(): value for key, value in row.items()} for row in csv.DictReader(handle)]
    if len(rows) < epochs:
        return None
    return {"mAP50": float(rows[-1]["metrics/mAP50(B)"]), "mAP50-95": float(rows[-1]["metrics/mAP50-95(B)"]),
            "train_s": float(rows[-1]["time"])}


def train_runs(models: list[str], seeds: list[int], epochs: int, img_size: int, batch: int,
               folder: Path) -> dict[tuple[str, int], dict[str, float]]:
    """Train every (model, seed) that has no finished run in `folder`; each run's output goes to its log file."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {}
    for model, seed in progress([(m, s) for s in seeds for m in models], desc="training", unit="run"):
        run = folder / run_name(model, seed)
        done = _last_epoch(run / "results.csv", epochs)
        if done is None:
            run.mkdir(exist_ok=True)
            with (folder / f"{run.name}.log").open("w") as log:
                result = subprocess.run(train_command(model, seed, epochs, img_size, batch, folder), stdout=log,
                                        stderr=subprocess.STDOUT, env={**os.environ, "YOLO_OFFLINE": "1"})
            done = _last_epoch(run / "results.csv", epochs)
            if result.returncode != 0 or done is None:
                raise UserError(f"training {model} (seed {seed}) failed; see {folder / (run.name + '.log')}")
        metrics[model, seed] = done
    return metrics


def _detection_model(name: str) -> torch.nn.Module:
    """The model `name` (a YAML of ultralytics or a generated BRA name) for 80 classes, fused, in eval mode."""
    from ultralytics.nn.tasks import DetectionModel

    from ..integrations.ultralytics import model_file

    torch.manual_seed(0)
    return DetectionModel(model_file(name), verbose=False).fuse(verbose=False).eval()


def size_and_speed(models: list[str], img_size: int = 640, rounds: int = 7,
                   warmup: int = 2) -> dict[str, dict[str, Any]]:
    """Parameters, GFLOPs and CPU latency (batch 1) of each model at img_size x img_size."""
    from ..analysis.flops import total_multiply_adds

    built = {name: _detection_model(name) for name in models}
    images = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))

    def forward(model: torch.nn.Module) -> None:
        with torch.inference_mode():
            model(images)

    times = interleaved_seconds({name: (lambda model=model: forward(model)) for name, model in built.items()},
                                torch.device("cpu"), rounds, warmup, "latency")
    out = {}
    for name, model in built.items():
        multiply_adds = total_multiply_adds(model, (img_size, img_size))
        ms, ms_range = median_and_range_ms(times[name])
        params = sum(parameter.numel() for parameter in model.parameters())
        out[name] = {"params_M": round(params / 1e6, 2), "GFLOPs_640": round(2 * multiply_adds / 1e9, 1),
                     "cpu_ms_640": round(ms, 1), "cpu_ms_range": ms_range}
    return out


def bench_yolo(models: list[str], seeds: list[int], epochs: int, img_size: int, batch: int, folder: str | Path,
               latency_size: int = 640, rounds: int = 7) -> list[dict[str, Any]]:
    """One row per model: accuracy over the seeds, size and CPU latency (see the module docstring)."""
    folder = Path(folder)
    metrics = train_runs(models, seeds, epochs, img_size, batch, folder)
    speed = size_and_speed(models, latency_size, rounds)
    rows = []
    for model in models:
        row: dict[str, Any] = {"model": Path(model).stem}
        for key in ("mAP50", "mAP50-95"):
            values = [metrics[model, seed][key] for seed in seeds]
            row[key] = round(statistics.median(values), 3)
            row[f"{key}_range"] = f"{min(values):.3f}-{max(values):.3f}"
        row["train_s"] = round(statistics.median(metrics[model, seed]["train_s"] for seed in seeds))
        rows.append({**row, **speed[model]})
    return rows
