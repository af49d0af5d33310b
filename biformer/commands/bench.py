"""`biformer bench`: speed and memory of the BRA backends (`op`) and of whole models (`model`)."""
from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

import torch

from ..benchmarks.model import COLUMNS as MODEL_COLUMNS
from ..benchmarks.model import (
    DEFAULT_MODELS,
    ModelEntry,
    bench_models,
    build_models,
    read_flops_table,
)
from ..benchmarks.op import AUTO, OpShape, bench_op, stage_shapes
from ..benchmarks.op import COLUMNS as OP_COLUMNS
from ..errors import UserError
from ..files import check_writable
from ..measure import format_table, write_csv
from ..ops.backends import BACKENDS

DTYPES = ("float32", "float16", "bfloat16")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmark the BRA backends or whole models",
        description="Interleaved benchmarks: every candidate runs once per round, so a busy spell of the "
                    "machine slows all of them alike; medians are reported.",
    )
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    op = kinds.add_parser(
        "op", help="each BRA backend beside the original release's algorithm on BiFormer-T/S stage shapes",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Forward, forward+backward and peak memory of bi_level_routing_attention (routing included) "
                    "for each backend, beside the original release's gather algorithm (backend 'original'); "
                    "max_abs_err is each backend's largest difference from the reference backend.",
    )
    op.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                    help="backends to compare with the original, 'auto' for automatic dispatch "
                         "(default: auto and every registered one)")
    op.add_argument("--shape", action="append", default=None, metavar="[NAME=]H,W,DIM,HEADS,N_WIN,TOPK",
                    help="a layer shape (repeatable); default: the BiFormer-T/S stages at 224x224")
    op.add_argument("--batch", type=int, default=8)
    op.add_argument("--padding", choices=("masked", "legacy"), default="masked")
    op.add_argument("--no-baseline", action="store_true",
                    help="leave the original algorithm out (it needs regions x topk copies of k and v)")
    _common_options(op, repeats=10)
    op.set_defaults(run=run_op)
    model = kinds.add_parser(
        "model", help="whole models: inference and training img/s, peak memory, achieved GFLOP/s",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Inference (eval, no autograd) and training-step (forward, cross-entropy, backward, SGD step) "
                    "throughput of BiFormer models and timm peers with similar FLOPs. A model may be written "
                    "MODEL[:backend=NAME][:compile] to force a BRA backend or torch.compile it for that entry only.",
    )
    model.add_argument("models", nargs="*", metavar="MODEL",
                       help="timm model names (default: biformer_tiny, biformer_small and their timm peers)")
    model.add_argument("--backend", default=None, help="force this BRA backend in every biformer model")
    model.add_argument("--compile", action="store_true", help="torch.compile every model")
    model.add_argument("--batch", type=int, default=8)
    model.add_argument("--img-size", type=int, default=224)
    model.add_argument("--no-train", action="store_true", help="inference only")
    model.add_argument("--flops", default=None, metavar="CSV",
                       help="MODEL,GMACS table (multiply-adds per image) to use instead of counting")
    _common_options(model, repeats=5)
    model.set_defaults(run=run_model)


def _common_options(parser: argparse.ArgumentParser, repeats: int) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each candidate first")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    parser.add_argument("--csv", default=None, metavar="PATH", help="also write the table as CSV")


def _setup(args: argparse.Namespace):
    for name in ("repeats", "batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be at least 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.csv:
        check_writable(args.csv, "--csv")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise UserError(f"--device {args.device!r} is not a torch device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device")
    return device, getattr(torch, args.dtype)


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's CPU thread count set for the benchmark, restored afterwards (the CLI may run in-process)."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _report(rows: list[dict], columns: tuple[str, ...], csv_path: str | None, title: str) -> None:
    shown = [c for c in columns if any(row.get(c) is not None for row in rows)]
    print(title)
    print(format_table(rows, shown))
    if csv_path:
        write_csv(rows, columns, csv_path)
        print(f"wrote {csv_path}")


def run_op(args: argparse.Namespace) -> int:
    device, dtype = _setup(args)
    backends = args.backends or [AUTO, *BACKENDS]
    unknown = [b for b in backends if b not in BACKENDS and b != AUTO]
    if unknown:
        raise UserError(f"unknown backend(s) {unknown}; choose from {[AUTO, *BACKENDS]}")
    try:
        shapes = [OpShape.parse(s, args.batch) for s in args.shape] if args.shape else stage_shapes(args.batch)
    except ValueError as error:
        raise UserError(str(error)) from None
    for shape in shapes:
        if shape.n_win > min(shape.height, shape.width) or shape.topk > shape.n_win**2:
            raise UserError(f"shape {shape.name!r}: need N_WIN <= H, W and TOPK <= N_WIN^2")
    with _threads(args.threads):
        threads = torch.get_num_threads()
        rows = bench_op(shapes, backends, device, dtype, args.padding, args.repeats, args.warmup, not args.no_memory,
                        baseline=not args.no_baseline)
    _report(rows, OP_COLUMNS, args.csv,
            f"BRA op, {args.dtype}, padding={args.padding}, {device}, {threads} threads, "
            f"median of {args.repeats} interleaved rounds (ms; speedup = original / backend)")
    return 0


def run_model(args: argparse.Namespace) -> int:
    device, dtype = _setup(args)
    if args.img_size < 32:
        raise UserError(f"--img-size must be at least 32, got {args.img_size}")
    if args.backend is not None and args.backend not in BACKENDS:
        raise UserError(f"unknown --backend {args.backend!r}; choose from {list(BACKENDS)}")
    try:
        entries = [ModelEntry.parse(text, args.backend, args.compile) for text in args.models or DEFAULT_MODELS]
        flops = read_flops_table(args.flops) if args.flops else None
        models = build_models(entries, device)
    except (ValueError, OSError) as error:
        raise UserError(str(error)) from None
    with _threads(args.threads):
        threads = torch.get_num_threads()
        rows = bench_models(models, device, dtype, args.batch, args.img_size, args.repeats, args.warmup,
                            train=not args.no_train, memory=not args.no_memory, flops=flops)
    _report(rows, MODEL_COLUMNS, args.csv,
            f"models at {args.img_size}x{args.img_size}, batch {args.batch}, {args.dtype}, {device}, "
            f"{threads} threads, median of {args.repeats} interleaved rounds")
    return 0
