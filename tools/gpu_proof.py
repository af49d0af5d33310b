"""The GPU figures of BRA's kernels and models, in one run of at most about 5 minutes on a CUDA machine.

Usage: python tools/gpu_proof.py OUT_DIR [--budget-s 300] [--sections NAME ...]

Each section runs in a child process under its own time cap (cut to what is left of the budget) and appends
rows to OUT_DIR/gpu_proof.csv as it measures (section, subject, metric, value, unit, note), so a cut-off run
still leaves what it measured. Without a CUDA device every section writes one "skipped" row and exits cleanly.

Sections:
  tests       pytest -m gpu tests/test_ops_backends.py (both Triton backends on CUDA)
  syncs       host syncs of a biformer_small training step, per Triton backend (torch's sync debug mode)
  profile     torch.profiler kernel counts and CUDA time per category, biformer_small and swin_tiny
  ops         per-stage op times (triton, triton_region, dense, flex; forward, forward+backward) beside a copy of
              the same bytes (q, k, v, out)
  eager       images/s at batch 128, bf16: biformer_small (auto, each backend, BRA as identity), swin_tiny
  compiled    the same under torch.compile (auto backend and triton_region), swin_tiny
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# section: its time cap in seconds
# caps adding up to the default budget (the machine start and the transfers come on top)
SECTIONS = {"tests": 100, "syncs": 20, "profile": 35, "ops": 40, "eager": 45, "compiled": 60}
CSV_NAME = "gpu_proof.csv"
FIELDS = ("section", "subject", "metric", "value", "unit", "note")
BATCH, IMG = 128, 224
PEER = "swin_tiny_patch4_window7_224"
BACKENDS = ("triton", "triton_region", "dense", "indexed")


class Rows:
    """Appends rows to the CSV, flushed at once (a run cut off keeps them)."""

    def __init__(self, out: Path, section: str) -> None:
        self.path, self.section = out / CSV_NAME, section

    def add(self, subject: str, metric: str, value, unit: str = "", note: str = "") -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(FIELDS)
            writer.writerow([self.section, subject, metric, value, unit, note])
        print(f"{self.section:9s} {subject:44s} {metric:18s} {value} {unit} {note}", flush=True)


def _model(name: str, identity_bra: bool = False):
    import timm

    import biformer.models  # noqa: F401  (registers the BiFormer models)
    from biformer.ops import BiLevelRoutingAttention

    model = timm.create_model(name).cuda()
    if identity_bra:  # the model without its routed attention: how much of its time BRA takes
        for parent in list(model.modules()):
            for child_name, child in parent.named_children():
                if isinstance(child, BiLevelRoutingAttention):
                    setattr(parent, child_name, torch.nn.Identity())
    return model


def _step(model, images, labels, backend, train: bool, runner=None):
    """One inference forward or training step (bf16 autocast; SGD) under a forced BRA backend."""
    from biformer.ops import use_backend

    runner = model if runner is None else runner
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9) if train else None

    def run():
        with use_backend(model, backend), torch.autocast("cuda", dtype=torch.bfloat16):
            if not train:
                with torch.inference_mode():
                    return runner(images)
            loss = torch.nn.functional.cross_entropy(runner(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train(train)
    return run


def _inputs():
    return torch.randn(BATCH, 3, IMG, IMG, device="cuda"), torch.randint(0, 1000, (BATCH,), device="cuda")


def section_tests(rows: Rows, out: Path) -> None:
    """pytest -v, its log parsed per test, so that a run stopped at the cap still reports what finished."""
    log = out / "pytest.log"
    workers = ["-n", "12"] if importlib.util.find_spec("xdist") else []  # pytest-xdist, where installed
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "gpu", *workers,
               str(REPO / "tests" / "test_ops_backends.py")]
    with open(log, "w") as handle:
        returncode = _run_capped(command, SECTIONS["tests"] - 10, stdout=handle, stderr=subprocess.STDOUT)
    note = "stopped at the cap: tests not listed did not finish" if returncode is None else f"pytest rc {returncode}"
    outcome_of: dict[str, str] = {}  # test id -> its outcome (the summary repeats failures)
    for line in log.read_text().splitlines():
        match = re.search(r"(PASSED|FAILED|SKIPPED|ERROR) tests/\S+?::(.*?)(?: - .*)?\s*$", line)
        if match:
            outcome_of[match.group(2)] = match.group(1)
    for outcome in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
        count = sum(value == outcome for value in outcome_of.values())
        rows.add("tests/test_ops_backends.py -m gpu", outcome.lower(), count, note=note)
    for name, outcome in outcome_of.items():
        if outcome in ("FAILED", "ERROR"):
            rows.add(name, "failed", 1)


def section_syncs(rows: Rows, out: Path) -> None:
    images, labels = _inputs()
    model = _model("biformer_small")
    for backend in ("triton", "triton_region"):  # one backend's failure must not hide the other's figure
        subject = f"biformer_small train backend={backend}"
        try:
            step = _step(model, images, labels, backend, train=True)
            step()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        except Exception as error:  # noqa: BLE001  (reported as a row)
            rows.add(subject, "host_syncs", "failed", note=f"{type(error).__name__}: {str(error)[:150]}")
            continue
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        rows.add(subject, "host_syncs", syncs, "per step", "stage-3 layers run the backend too (forced)")


def _category(kernel: str) -> str:
    name = kernel.lower()
    for category, keys in (("bra_attention", ("routed_attention", "region_attention")),
                           ("sdpa", ("flash", "fmha", "attention")), ("gemm", ("gemm", "xmma", "cutlass", "nvjet")),
                           ("conv", ("conv", "cudnn", "implicit")), ("topk_sort", ("topk", "sort", "radix", "scan")),
                           ("norm", ("norm",)), ("reduce", ("reduce",)), ("copy_cast", ("copy", "cast")),
                           ("elementwise", ("elementwise", "vectorized", "unrolled"))):
        if any(key in name for key in keys):
            return category
    return "other"


def section_profile(rows: Rows, out: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    images, labels = _inputs()
    for name in ("biformer_small", PEER):
        model = _model(name)
        for train in (False, True):
            step = _step(model, images, labels, None, train)
            step(), step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            totals: dict[str, list[float]] = {}
            for event in prof.key_averages():
                if event.device_type != torch.autograd.DeviceType.CUDA:
                    continue
                count, ms = totals.setdefault(_category(event.key), [0, 0.0])
                totals[_category(event.key)] = [count + event.count, ms + event.device_time_total / 1e3]
            mode = "train" if train else "infer"
            for category, (count, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
                rows.add(f"{name} {mode} {category}", "kernels", count, note=f"{ms:.2f} ms")
            rows.add(f"{name} {mode} all", "kernels", sum(c for c, _ in totals.values()),
                     note=f"{sum(ms for _, ms in totals.values()):.2f} ms")


def section_ops(rows: Rows, out: Path) -> None:
    from biformer.benchmarks.op import bench_op, stage_shapes
    from biformer.measure import interleaved_median_seconds

    device = torch.device("cuda")
    for shape in stage_shapes(64):
        results = []
        for backend in ("triton", "triton_region", "dense", "flex"):  # flex failed its GPU tests: on its own
            try:
                results += bench_op([shape], [backend], device, torch.bfloat16, "masked", repeats=10, warmup=2,
                                    memory=False, baseline=False)
            except Exception as error:  # noqa: BLE001  (reported as a row)
                rows.add(f"{shape.name} {backend}", "fwd_ms", "failed", note=f"{type(error).__name__}: {str(error)[:150]}")
        for result in results:
            note = result.get("note") or ""
            for metric in ("fwd_ms", "fwd_bwd_ms"):
                if result.get(metric) is not None:
                    rows.add(f"{shape.name} {result['backend']}", metric, f"{result[metric]:.4f}", "ms", note)
        tokens = shape.batch * shape.height * shape.width * shape.dim
        source = torch.empty(4 * tokens, dtype=torch.bfloat16, device=device)  # q, k, v, out
        target = torch.empty_like(source)
        seconds = interleaved_median_seconds({"copy": lambda: target.copy_(source)}, device, 20, 3)["copy"]
        rows.add(f"{shape.name} copy of q,k,v,out", "ms", f"{seconds * 1e3:.4f}", "ms", "read + write the same bytes")


def _throughput(rows: Rows, compiled: bool) -> None:
    from biformer.measure import interleaved_median_seconds

    images, labels = _inputs()
    entries = [("biformer_small", None, False)]
    if compiled:
        entries += [("biformer_small", "triton_region", False), (PEER, None, False)]
    else:
        entries += [("biformer_small", name, False) for name in BACKENDS] + [("biformer_small", None, True),
                                                                             (PEER, None, False)]
    for train in (False, True):
        runs = {}
        for name, backend, identity in entries:
            model = _model(name, identity)
            runner = torch.compile(model) if compiled else model
            label = f"{name} " + ("bra=identity" if identity else f"backend={backend or 'auto'}")
            runs[label] = _step(model, images, labels, backend, train, runner)
        mode = "train" if train else "infer"
        for label, run in runs.items():  # one candidate's failure must not hide the others' figures
            try:
                seconds = interleaved_median_seconds({label: run}, torch.device("cuda"), 5, 2)[label]
                rows.add(label, f"{mode}_img_s", f"{BATCH / seconds:.1f}", "img/s")
            except Exception as error:  # noqa: BLE001  (reported as a row)
                rows.add(label, f"{mode}_img_s", "failed", note=f"{type(error).__name__}: {str(error)[:150]}")


def section_eager(rows: Rows, out: Path) -> None:
    _throughput(rows, compiled=False)


def section_compiled(rows: Rows, out: Path) -> None:
    _throughput(rows, compiled=True)


def _run_section(name: str, out: Path) -> None:
    rows = Rows(out, name)
    if not torch.cuda.is_available():
        rows.add("-", "skipped", 1, note="no CUDA device")
        return
    globals()[f"section_{name}"](rows, out)


def _run_capped(command: list[str], seconds: float, **kwargs) -> int | None:
    """The command's return code, or None if it ran past `seconds`: then it is killed with every process it
    started (pytest's workers, compile workers), so that none of them shares the GPU with the next section."""
    process = subprocess.Popen(command, start_new_session=True, **kwargs)
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--run-section", choices=list(SECTIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.run_section:
        _run_section(args.run_section, args.out)
        return 0
    if torch.cuda.is_available():
        Rows(args.out, "device").add(torch.cuda.get_device_name(), "torch", torch.__version__)
    deadline = time.monotonic() + args.budget_s
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    for name in args.sections:
        cap = min(SECTIONS[name], deadline - time.monotonic())
        if cap < 5:
            Rows(args.out, name).add("-", "not_run", 1, note="budget spent")
            continue
        started = time.monotonic()
        returncode = _run_capped([sys.executable, __file__, str(args.out), "--run-section", name], cap, env=env)
        status = f"cut at its {cap:.0f} s cap" if returncode is None else f"rc {returncode}"
        Rows(args.out, name).add("-", "section_s", f"{time.monotonic() - started:.1f}", "s", status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
