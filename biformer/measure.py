"""Measuring: interleaved median timing, peak memory, and tables of results (used by benchmarks and analysis)."""
from __future__ import annotations

import csv
import math
import os
import statistics
import time
from typing import Any, Callable, Sequence

import torch

from .files import atomic_output
from .progress import progress


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_seconds(
    runs: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int, desc: str = "timing"
) -> dict[str, list[float]]:
    """Wall time of each callable in every round, measured round-robin so that they share machine conditions.

    Every round runs each callable once; a slow spell of the (shared) machine hits all of them
    alike instead of whichever happened to run then.
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in progress(range(repeats), desc=desc, unit="round"):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_median_seconds(
    runs: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int, desc: str = "timing"
) -> dict[str, float]:
    """Median of `interleaved_seconds`' rounds for each callable."""
    times = interleaved_seconds(runs, device, repeats, warmup, desc)
    return {name: statistics.median(values) for name, values in times.items()}


def median_and_range_ms(seconds: Sequence[float]) -> tuple[float, str]:
    """The median of `seconds` in milliseconds, and their range as "min-max" ms with one decimal."""
    ms = [value * 1e3 for value in seconds]
    return statistics.median(ms), f"{min(ms):.1f}-{max(ms):.1f}"


def peak_memory_bytes(run: Callable[[], Any], device: torch.device) -> int | None:
    """Peak of the memory that run() allocates above what was allocated before it; None if unmeasurable.

    CUDA: the caching allocator's peak. CPU: torch's profiler reports the CPU allocator's running
    total at every allocation and free; the peak is the largest total reached during run(). This
    counts tensor memory exactly (not the process RSS, which the C allocator's caching blurs).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return None
    try:
        from torch._C._profiler import _EventType
    except ImportError:  # private API of torch's profiler; moved in some future release
        return None
    # above kineto's ERROR (4) and USDT (5) levels: its GPU probe errs on CPU-only hosts and it logs every start/stop
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    peak = 0
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            peak = max(peak, event.extra_fields.total_allocated)
    return peak


def megabytes(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows of dicts as an aligned text table; floats to 3 significant figures, None as '-'."""

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    cells = [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: str) -> None:
    with atomic_output(path) as temp, open(temp, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
