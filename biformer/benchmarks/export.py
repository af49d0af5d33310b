"""`biformer bench export`: latency of exported models in ONNX Runtime beside eager PyTorch, on the CPU.

Every model is exported the same way (`biformer.export.write`: the dynamo exporter at a fixed size, one file per
batch size) and run by an ONNX Runtime session with every graph optimisation on and `threads` intra-op threads,
as a user deploying it would set them; eager PyTorch runs the same input with torch's threads, no autograd.
Timing is interleaved (`biformer.measure.interleaved_seconds`): after warm-up runs, each round runs every (model,
batch) once, so that a busy spell of the machine slows all alike; the table gives the median and range over the
rounds. ONNX Runtime's rounds and eager PyTorch's run apart: a runtime's idle threads spin for a while after each
run and would slow the other's.

With `profile`, ONNX Runtime's profiler runs one model's session a few times and the time is summed by operator
type: where an exported model's time goes.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

from ..export import ExportSettings, write
from ..measure import interleaved_seconds, median_and_range_ms
from ..progress import progress
from .model import ModelEntry, build_models

DEFAULT_MODELS = ("biformer_tiny", "biformer_small", "swin_tiny_patch4_window7_224", "convnext_tiny",
                  "deit_small_patch16_224")
COLUMNS = ("model", "batch", "onnxruntime_ms", "ort_range", "eager_ms", "eager_range", "ort_vs_eager")
PROFILE_COLUMNS = ("op_type", "ms_per_run", "share", "nodes")


def onnx_session(path: str | Path, threads: int, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session with every graph optimisation and `threads` intra-op threads (profiling into
    files named `profile_prefix`*.json if given)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if profile_prefix is not None:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def seeded_model(name: str) -> torch.nn.Module:
    """timm model `name` with random weights (seed 0), in eval mode; ValueError for an unknown name."""
    torch.manual_seed(0)
    entry = ModelEntry(name)
    return build_models([entry], torch.device("cpu"))[entry].eval()


def bench_export(names: list[str], batches: tuple[int, ...] = (1, 8), img_size: int = 224, threads: int = 2,
                 rounds: int = 7, warmup: int = 2, folder: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per (model, batch): ONNX Runtime (`threads` intra-op threads) and eager PyTorch (torch's threads
    as the caller set them) milliseconds per batch, median and range of interleaved rounds after `warmup` runs
    of each. The ONNX files go to `folder` (default: a temporary folder, removed after)."""
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() if folder is None else contextlib.nullcontext(folder) as where:
        runs: dict[tuple[str, int, str], Callable[[], Any]] = {}
        for name in progress(names, desc="exporting", unit="model"):
            model = seeded_model(name)
            for batch in batches:
                images = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(batch))
                path = Path(where) / f"{name}_b{batch}.onnx"
                write(model, images, path, ExportSettings("onnx"))
                session, feed = onnx_session(path, threads), {"images": images.numpy()}
                runs[name, batch, "onnxruntime"] = lambda session=session, feed=feed: session.run(None, feed)
                runs[name, batch, "eager"] = lambda model=model, images=images: _eager(model, images)
        # each runtime's rounds apart: one's idle threads spin for a while and would slow the other's runs
        times = {key: seconds for runtime in ("onnxruntime", "eager")
                 for key, seconds in interleaved_seconds({key: run for key, run in runs.items() if key[2] == runtime},
                                                         torch.device("cpu"), rounds, warmup, runtime).items()}
    rows = []
    for name in names:
        for batch in batches:
            ort_ms, ort_range = median_and_range_ms(times[name, batch, "onnxruntime"])
            eager_ms, eager_range = median_and_range_ms(times[name, batch, "eager"])
            rows.append({"model": name, "batch": batch, "onnxruntime_ms": round(ort_ms, 1), "ort_range": ort_range,
                         "eager_ms": round(eager_ms, 1), "eager_range": eager_range,
                         "ort_vs_eager": round(eager_ms / ort_ms, 2)})
    return rows


def _eager(model: torch.nn.Module, images: torch.Tensor) -> None:
    with torch.inference_mode():
        model(images)


def profile_onnx(name: str, batch: int = 1, img_size: int = 224, threads: int = 2, runs: int = 10,
                 top: int = 15) -> list[dict[str, Any]]:
    """ONNX Runtime's profile of model `name` exported as `bench_export` does: per operator type, the summed
    kernel time per run (ms), its share, and the node count; the `top` types by time."""
    model = seeded_model(name)
    images = torch.randn(batch, 3, img_size, img_size)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}.onnx"
        write(model, images, path, ExportSettings("onnx"))
        session, feed = onnx_session(path, threads, str(Path(folder) / "profile")), {"images": images.numpy()}
        session.run(None, feed)  # warm-up: its one-time costs are left out below
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = sorted((event for event in events if event.get("name") == "model_run"), key=lambda e: e["ts"])
    warm_up_end = model_runs[0]["ts"] + model_runs[0]["dur"]
    total_us: dict[str, float] = defaultdict(float)
    nodes: dict[str, set[str]] = defaultdict(set)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= warm_up_end:
            op = event["args"]["op_name"]
            total_us[op] += event["dur"]
            nodes[op].add(event["name"])
    whole = sum(total_us.values()) or 1.0
    ranked = sorted(total_us.items(), key=lambda item: -item[1])[:top]
    return [{"op_type": op, "ms_per_run": round(us / 1e3 / runs, 2), "share": f"{100 * us / whole:.1f}%",
             "nodes": len(nodes[op])} for op, us in ranked]
