"""`biformer bench deploy`: every model in every CPU runtime people deploy with, side by side, in one run.

Runtimes: eager PyTorch (inference mode); `torch.compile` for inference (inductor's CPU code, weights frozen
into the graph as constants); ONNX Runtime (the dynamo ONNX file of `biformer.export.write`, every graph
optimisation); OpenVINO (its CPU plugin, compiled from the same ONNX file, with its default precision for the
machine). Each runtime gets `threads` threads, as a user deploying would set them. For each (runtime, batch) the
models' rounds are interleaved (`biformer.measure.interleaved_seconds`), so that a busy spell slows all alike; the
runtimes run apart, since one's idle threads spin for a while after each run and would slow another's.

Each row: milliseconds per batch (median and range of the rounds), the speed against the reference model in the
same runtime and batch (> 1: faster), multiply-adds per second (the paper's FLOPs convention, computed) and their
share of this machine's float32 matmul peak (a large `torch.mm` at the same threads, measured in the run).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..analysis.flops import total_multiply_adds
from ..export import ExportSettings, openvino_core, write
from ..measure import interleaved_seconds, median_and_range_ms
from ..progress import progress
from .export import onnx_session, seeded_model

RUNTIMES = ("eager", "compiled", "onnxruntime", "openvino")
DEFAULT_MODELS = ("biformer_small", "swin_tiny_patch4_window7_224", "convnext_tiny", "deit_small_patch16_224")
REFERENCE = "swin_tiny_patch4_window7_224"
COLUMNS = ("runtime", "batch", "model", "ms", "range", "vs_reference", "gmacs_per_s", "of_peak")
PEAK_SIDE = 2048  # the matmul that measures the machine's float32 peak: 2048^3 multiply-adds


def matmul_peak_gmacs(side: int = PEAK_SIDE, rounds: int = 5) -> float:
    """This machine's float32 matmul rate at torch's threads: the best of `rounds` square products, GMAC/s."""
    a, b = torch.randn(side, side), torch.randn(side, side)
    torch.mm(a, b)  # warm-up
    best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(rounds))
    return side ** 3 / best / 1e9


def _seconds(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def runtime_run(runtime: str, model: torch.nn.Module, images: torch.Tensor, onnx_file: Path,
                threads: int) -> Callable[[], Any]:
    """A callable running `model` on `images` in `runtime` (built and loaded here; compiled lazily, at the first
    call, which the warm-up takes)."""
    if runtime == "eager":
        def run() -> Any:
            with torch.inference_mode():
                return model(images)
        return run
    if runtime == "compiled":
        import torch._inductor.config as inductor_config

        compiled = torch.compile(model, dynamic=False)  # a graph per batch, as a deployment fixes its shape

        def run_compiled() -> Any:
            # freezing: weights become graph constants, so inductor folds and pre-packs them for its matmuls
            with torch.no_grad(), inductor_config.patch(freezing=True):
                return compiled(images)
        return run_compiled
    if runtime == "onnxruntime":
        session, feed = onnx_session(onnx_file, threads), {"images": images.numpy()}
        return lambda: session.run(None, feed)
    if runtime == "openvino":
        compiled_model = openvino_core().compile_model(str(onnx_file), "CPU", {"INFERENCE_NUM_THREADS": threads})
        request, array = compiled_model.create_infer_request(), images.numpy()
        return lambda: request.infer([array])
    raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")


def bench_deploy(names: list[str], runtimes: tuple[str, ...] = RUNTIMES, batches: tuple[int, ...] = (1, 8),
                 img_size: int = 224, threads: int = 2, rounds: int = 7, warmup: int = 2,
                 reference: str = REFERENCE) -> list[dict[str, Any]]:
    """One row per (runtime, batch, model); see the module's docstring. `reference` must be among `names`. Eager
    and compiled PyTorch run at torch's threads, which the caller sets to `threads`."""
    unknown = [runtime for runtime in runtimes if runtime not in RUNTIMES]
    if unknown:
        raise ValueError(f"unknown runtime {unknown[0]!r}; choose from {', '.join(RUNTIMES)}")
    if reference not in names:
        raise ValueError(f"the reference model {reference!r} is not among the models timed ({', '.join(names)})")
    peak = matmul_peak_gmacs()
    models = {name: seeded_model(name) for name in progress(names, desc="building", unit="model")}
    macs = {name: total_multiply_adds(model, (img_size, img_size)) for name, model in models.items()}
    times: dict[tuple[str, int, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        inputs = {batch: torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(batch))
                  for batch in batches}
        onnx_files = {}
        if {"onnxruntime", "openvino"} & set(runtimes):
            for name in progress(names, desc="exporting", unit="model"):
                for batch in batches:
                    onnx_files[name, batch] = Path(folder) / f"{name}_b{batch}.onnx"
                    write(models[name], inputs[batch], onnx_files[name, batch], ExportSettings("onnx"))
        for runtime in runtimes:
            for batch in batches:
                runs = {(runtime, batch, name): runtime_run(runtime, models[name], inputs[batch],
                                                            onnx_files.get((name, batch), Path()), threads)
                        for name in names}
                times.update(interleaved_seconds(runs, torch.device("cpu"), rounds, warmup, f"{runtime} b{batch}"))
    rows = []
    for runtime in runtimes:
        for batch in batches:
            reference_ms = median_and_range_ms(times[runtime, batch, reference])[0]
            for name in names:
                ms, spread = median_and_range_ms(times[runtime, batch, name])
                rate = macs[name] * batch / (ms / 1e3) / 1e9
                rows.append({"runtime": runtime, "batch": batch, "model": name, "ms": float(f"{ms:.3g}"), "range": spread,
                             "vs_reference": round(reference_ms / ms, 2), "gmacs_per_s": round(rate, 1),
                             "of_peak": f"{100 * rate / peak:.0f}%"})
    return rows
