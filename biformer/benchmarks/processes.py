"""Measuring in a fresh process: peak resident memory (RSS) of one run, and running a benchmark module's
`_child_main` in a new Python process (Linux: /proc/self/status and getrusage's KiB)."""
from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable


def current_rss_mb() -> float:
    """The process's resident set size now (VmRSS, kB) in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


def peak_rss(prepare: Callable[[], Callable[[], None]], threads: int | None = None) -> dict[str, Any]:
    """Peak RSS of one run in this process (call it in a fresh one): with torch's threads set and its generator
    seeded, `prepare()` builds the model and input and returns the run; the RSS after building is "loaded"."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    run = prepare()
    gc.collect()
    loaded = current_rss_mb()
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return dict(loaded_mb=loaded, peak_rss_mb=peak, over_loaded_mb=peak - loaded, threads=torch.get_num_threads())


def run_in_child(module: str, request: dict[str, Any], what: str, timeout: float | None = None) -> Any:
    """`module._child_main()` in a fresh Python process, given `request` as JSON in argv[1]; the JSON it prints
    last. RuntimeError (naming `what`, with the child's stderr) if the child fails."""
    code = f"from {module} import _child_main; _child_main()"
    package_root = str(Path(__file__).resolve().parents[2])  # this copy of biformer, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(request)], capture_output=True, text=True, env=env,
                          check=False, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {what} failed (exit status {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
