"""`biformer bench`: speed and memory of the BRA backends (`op`), of whole models (`model`), the CUDA work of
whole models counted without a GPU (`trace`), the process memory of segmentation models (`segmentation`), and
the memory and speed of detection models (`detection`)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Iterator

import torch

from ..benchmarks import deploy as deploy_bench
from ..benchmarks import detection as detection_bench
from ..benchmarks import export as export_bench
from ..benchmarks import kernels as kernels_bench
from ..benchmarks import segmentation as segmentation_bench
from ..benchmarks import trace as trace_bench
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
from ..files import atomic_output, check_writable
from ..measure import format_table, write_csv
from ..ops.backends import BACKENDS
from ._options import HelpFormatter, non_negative, positive
from .yolo import require_integration

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
        formatter_class=HelpFormatter,
        description="Forward, forward+backward and peak memory of bi_level_routing_attention (routing included) "
                    "for each backend, beside the original release's gather algorithm (backend 'original'); "
                    "max_abs_err is each backend's largest difference from the reference backend.",
    )
    op.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                    help="backends to compare with the original, 'auto' for automatic dispatch "
                         "(default: auto and every registered one)")
    op.add_argument("--shape", action="append", default=None, metavar="[NAME=]SIZES,DIM,HEADS,N_WIN,TOPK",
                    help="a layer shape (repeatable): 1 to 3 sizes (L; H,W; T,H,W), N_WIN an int or one per axis "
                         "joined by x (clip=16,112,112,64,2,2x7x7,8); default: the BiFormer-T/S stages at 224x224")
    op.add_argument("--batch", type=int, default=8, help="images per layer call")
    op.add_argument("--padding", choices=("masked", "legacy"), default="masked",
                    help="how maps that are no multiple of the region count are padded (see BiLevelRoutingAttention)")
    op.add_argument("--no-baseline", action="store_true",
                    help="leave the original algorithm out (it needs regions x topk copies of k and v)")
    _common_options(op, repeats=10)
    op.set_defaults(run=run_op)
    model = kinds.add_parser(
        "model", help="whole models: inference and training img/s, peak memory, achieved GFLOP/s",
        formatter_class=HelpFormatter,
        description="Inference (eval, no autograd) and training-step (forward, cross-entropy, backward, SGD step) "
                    "throughput of BiFormer models and timm peers with similar FLOPs. A model may be written "
                    "MODEL[:backend=NAME][:compile] to force a BRA backend or torch.compile it for that entry only.",
    )
    model.add_argument("models", nargs="*", metavar="MODEL",
                       help="timm model names (default: biformer_tiny, biformer_small and their timm peers)")
    model.add_argument("--backend", default=None, help="force this BRA backend in every biformer model")
    model.add_argument("--compile", action="store_true", help="torch.compile every model")
    model.add_argument("--batch", type=int, default=8, help="images per forward pass")
    model.add_argument("--img-size", type=int, default=224, help="input height and width")
    model.add_argument("--frames", type=int, default=None,
                       help="time clip models (biformer3d_*, torchvision's swin3d_t, r3d_18, ...) on clips of this "
                            "many frames; rates then count clips")
    model.add_argument("--no-train", action="store_true", help="inference only")
    model.add_argument("--flops", default=None, metavar="CSV",
                       help="MODEL,GMACS table (multiply-adds per image) to use instead of counting")
    _common_options(model, repeats=5)
    model.set_defaults(run=run_model)
    _register_trace(kinds)
    _register_kernels(kinds)
    _register_segmentation(kinds)
    _register_volumes(kinds)
    _register_detection(kinds)
    _register_export(kinds)
    _register_deploy(kinds)
    _register_yolo(kinds)


def _register_trace(kinds: argparse._SubParsersAction) -> None:
    trace = kinds.add_parser(
        "trace", help="the CUDA work of whole models, counted without a GPU: launches, bytes, FLOPs, host syncs",
        formatter_class=HelpFormatter,
        description="Runs each model on fake CUDA tensors (no GPU needed; nothing is timed) under the autocast of "
                    "--dtype and counts, in total and per category (routing, attention, casts, module classes): "
                    "kernel launches, bytes read and written, FLOPs and host synchronisations. See "
                    "biformer.benchmarks.trace for the counting rules. A model may be written MODEL[:backend=NAME].",
    )
    trace.add_argument("models", nargs="*", metavar="MODEL",
                       help="timm model names (default: biformer_small swin_tiny_patch4_window7_224)")
    trace.add_argument("--mode", nargs="+", choices=trace_bench.MODES, default=list(trace_bench.MODES),
                       help="inference forward and/or training step (forward, cross-entropy, backward, SGD step)")
    trace.add_argument("--batch", type=int, default=128, help="images per traced step")
    trace.add_argument("--img-size", type=int, default=224, help="input height and width")
    trace.add_argument("--frames", type=int, default=None,
                       help="trace clip models (biformer3d_*, torchvision's swin3d_t, r3d_18, ...) on clips of this "
                            "many frames")
    trace.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="autocast dtype (float32: none)")
    trace.add_argument("--unfused-sdpa", action="store_true",
                       help="count scaled_dot_product_attention as its math decomposition, not one fused kernel")
    trace.add_argument("--json", default=None, metavar="PATH", help="write every trace (categories, ops) as JSON")
    trace.add_argument("--csv", default=None, metavar="PATH", help="also write the table as CSV")
    trace.set_defaults(run=run_trace)


def _register_kernels(kinds: argparse._SubParsersAction) -> None:
    kernels = kinds.add_parser(
        "kernels", help="the Triton attention kernels without a GPU: useful work, registers, spills (sm_90)",
        formatter_class=HelpFormatter,
        description="For each Triton backend and BiFormer-S stage at 224 px: the useful fraction of the forward's "
                    "computed score entries (valid / computed, from the kernel's tiling), and registers per "
                    "thread, spill bytes and shared memory of the forward, dq and dk/dv kernels compiled offline "
                    "for sm_90 by Triton's own ptxas. Nothing runs; no GPU is needed.",
    )
    kernels.add_argument("--backends", nargs="+", choices=kernels_bench.BACKENDS, default=list(kernels_bench.BACKENDS),
                         help="the Triton backends whose kernels are compiled")
    kernels.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["bfloat16", "float32"],
                         help="the input dtypes compiled for")
    kernels.add_argument("--csv", default=None, metavar="PATH", help="also write the table as CSV")
    kernels.set_defaults(run=run_kernels)


def _register_segmentation(kinds: argparse._SubParsersAction) -> None:
    segmentation = kinds.add_parser(
        "segmentation", help="peak process memory (RSS) of segmentation inference and backbone training, on CPU",
        description=f"Each case runs in a fresh Python process, whose peak RSS is the case's own; over_loaded_mb "
                    f"is the peak less the RSS right after the model was built and the input made (MB: 2**20 bytes). "
                    f"inference: {segmentation_bench.INFERENCE_MODEL}, {segmentation_bench.CITYSCAPES_CLASSES} classes, eval, "
                    f"no autograd, at 1x3x1024x2048 (target: peak at most {segmentation_bench.INFERENCE_TARGET_MB:.0f} MB). "
                    f"training: a BiFormer dense backbone with n_win {segmentation_bench.TRAINING_N_WIN}, forward and backward "
                    f"at 2x3x600x500, with our BRA backends and with the original release's algorithm (target: at "
                    f"most {segmentation_bench.TRAINING_TARGET_MB:.0f} MB over the loaded model). Linux only.",
    )
    segmentation.add_argument("--case", choices=(*segmentation_bench.CASES, "all"), default="all", help="what to measure (default: all)")
    segmentation.add_argument("--model", default=None, metavar="NAME",
                       help="with --case inference a segmentation model (default "
                            f"{segmentation_bench.INFERENCE_MODEL}); with --case training a BiFormer variant (default "
                            f"{segmentation_bench.TRAINING_MODEL})")
    segmentation.add_argument("--input", default=None, metavar="B,H,W",
                       help="batch and image size instead of the case's (with --case inference or training)")
    _threads_and_csv_options(segmentation)
    segmentation.set_defaults(run=run_segmentation)


def _register_volumes(kinds: argparse._SubParsersAction) -> None:
    from ..benchmarks import volumes as volumes_bench  # MONAI is imported only when a case runs

    volumes = kinds.add_parser(
        "volumes", help="peak memory (RSS) and volumes/s of 3-D segmentation models on CPU, each case in a fresh process",
        formatter_class=HelpFormatter,
        description="For each model, side and mode: batch 1, one input channel, 14 classes; inference (eval, no "
                    "autograd) or a training step (cross-entropy, backward, SGD step); one untimed run, then "
                    "--repeats timed ones (volumes/s from their median); peak RSS of the fresh process. Models: ours by "
                    "name, MONAI's swinunetr-<feature size> and monai_unet. Linux only; needs the medical extra.",
    )
    volumes.add_argument("models", nargs="*", metavar="MODEL",
                         help=f"default: {', '.join(volumes_bench.DEFAULT_MODELS)}")
    volumes.add_argument("--sides", type=int, nargs="+", default=list(volumes_bench.SIDES), help="volume sides in voxels")
    volumes.add_argument("--modes", nargs="+", choices=volumes_bench.MODES, default=list(volumes_bench.MODES),
                         help="inference (eval, no autograd) and/or a training step")
    volumes.add_argument("--repeats", type=int, default=2, help="timed runs per case (median reported)")
    _threads_and_csv_options(volumes)
    volumes.set_defaults(run=run_volumes)


def _register_detection(kinds: argparse._SubParsersAction) -> None:
    detection = kinds.add_parser(
        "detection", help="peak memory (RSS) and images/s of detection models on CPU, in one interleaved run",
        formatter_class=HelpFormatter,
        description="For each model, batch 1, 80 classes: peak RSS of inference and of a training step (forward "
                    "with five synthetic boxes and masks, backward), each in a fresh process; then images/s of both "
                    "in one process that runs every model in turn per round (median and range over the rounds). "
                    f"Target: {detection_bench.TARGET_MODEL} inference at most 3 GB at 800x1333. Linux only.",
    )
    detection.add_argument("models", nargs="*", metavar="MODEL",
                           help=f"a detection model HEAD_BACKBONE (e.g. {detection_bench.TARGET_MODEL}), or torchvision's "
                                f"{', '.join(detection_bench.TORCHVISION_MODELS)} (default: "
                                f"{', '.join(detection_bench.DEFAULT_MODELS)})")
    detection.add_argument("--size", type=int, nargs=2, default=list(detection_bench.DEFAULT_SIZE), metavar=("H", "W"),
                           help="input image size (the models resize its shorter side to min(H, W))")
    detection.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    _threads_and_csv_options(detection)
    detection.set_defaults(run=run_detection)


def _register_export(kinds: argparse._SubParsersAction) -> None:
    export = kinds.add_parser(
        "export", help="exported models in ONNX Runtime beside eager PyTorch, on CPU: ms per batch",
        formatter_class=HelpFormatter,
        description="Each model is exported with the dynamo ONNX exporter at a fixed size (one file per batch) and "
                    "run by ONNX Runtime (every graph optimisation, --threads intra-op threads) and by eager "
                    "PyTorch (as many threads, no autograd), interleaved: median and range of --rounds rounds. "
                    "With --profile MODEL: ONNX Runtime's profile of that model instead, by operator type.",
    )
    export.add_argument("models", nargs="*", metavar="MODEL",
                        help=f"timm model names (default: {' '.join(export_bench.DEFAULT_MODELS)})")
    _runtime_timing_options(export, "ONNX Runtime and torch CPU threads", "untimed runs of each first")
    export.add_argument("--keep", default=None, metavar="FOLDER", help="keep the ONNX files in this folder")
    export.add_argument("--profile", default=None, metavar="MODEL",
                        help="print ONNX Runtime's profile of MODEL (batch: the first of --batches) instead")
    export.set_defaults(run=run_export)


def _runtime_timing_options(parser: argparse.ArgumentParser, threads_help: str, warmup_help: str) -> None:
    """The options of the benchmarks that time exported models: batches, size, threads, rounds, CSV."""
    parser.add_argument("--batches", type=positive, nargs="+", default=[1, 8], help="batch sizes timed")
    parser.add_argument("--img-size", type=positive, default=224, help="input height and width")
    parser.add_argument("--threads", type=positive, default=2, help=threads_help)
    parser.add_argument("--rounds", type=positive, default=7, help="timed rounds")
    parser.add_argument("--warmup", type=non_negative, default=2, help=warmup_help)
    parser.add_argument("--csv", default=None, metavar="PATH", help="also write the table as CSV")


def _register_deploy(kinds: argparse._SubParsersAction) -> None:
    deploy = kinds.add_parser(
        "deploy", help="every model in every CPU runtime (eager, torch.compile, ONNX Runtime, OpenVINO): ms per batch",
        formatter_class=HelpFormatter,
        description="Times each model in eager PyTorch, torch.compile (inductor, frozen weights), ONNX Runtime and "
                    "OpenVINO (both from the dynamo ONNX file) at each batch, --threads threads each: median and "
                    "range of --rounds rounds interleaved across the models (runtimes apart); the speed against "
                    "--reference in the same runtime and batch; multiply-adds per second and their share of this "
                    "machine's float32 matmul peak (measured in the run). Run it alone on the machine.",
    )
    deploy.add_argument("models", nargs="*", metavar="MODEL",
                        help=f"timm model names (default: {' '.join(deploy_bench.DEFAULT_MODELS)})")
    deploy.add_argument("--runtimes", nargs="+", choices=deploy_bench.RUNTIMES, default=list(deploy_bench.RUNTIMES),
                        help="the runtimes timed")
    deploy.add_argument("--reference", default=deploy_bench.REFERENCE, help="the model the others are compared to")
    _runtime_timing_options(deploy, "every runtime's CPU threads", "untimed runs of each first (compiles)")
    deploy.set_defaults(run=run_deploy)


def _register_yolo(kinds: argparse._SubParsersAction) -> None:
    from ..benchmarks.yolo import DEFAULT_MODELS as YOLO_MODELS

    yolo = kinds.add_parser(
        "yolo", help="YOLO with and without BRA, trained on digit-scenes on CPU: mAP, size, latency",
        formatter_class=HelpFormatter,
        description="Trains every model from scratch with one shared command (`biformer yolo train ... "
                    "data=digit-scenes`, the options below, one process per run) for each seed; reports mAP50 and "
                    "mAP50-95 of the last epoch (median and range over the seeds), parameters, GFLOPs at 640x640 "
                    "(2 x multiply-adds, attention included) and CPU latency at 640x640, batch 1 (interleaved "
                    "rounds). Finished runs in --output are read back, not trained again. Needs the ultralytics extra.",
    )
    yolo.add_argument("models", nargs="*", metavar="MODEL",
                      help=f"ultralytics YAMLs or generated BRA names (default: {' '.join(YOLO_MODELS)})")
    yolo.add_argument("--seeds", type=non_negative, nargs="+", default=[0, 1, 2], help="a training run per seed and model")
    yolo.add_argument("--epochs", type=positive, default=20, help="epochs of every run")
    yolo.add_argument("--img-size", type=positive, default=128, help="training and validation size (the scenes')")
    yolo.add_argument("--batch", type=positive, default=16, help="images per training step")
    yolo.add_argument("--output", default="runs/bench-yolo", help="the runs' folder (finished runs are reused)")
    yolo.add_argument("--rounds", type=positive, default=7, help="timed latency rounds")
    _threads_and_csv_options(yolo)
    yolo.set_defaults(run=run_yolo)


def _threads_and_csv_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--csv", default=None, metavar="PATH", help="also write the table as CSV")


def _check_threads_and_csv(args: argparse.Namespace) -> None:
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.csv:
        check_writable(args.csv, "--csv")


def _common_options(parser: argparse.ArgumentParser, repeats: int) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the inputs' and weights' dtype")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each candidate first")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    _threads_and_csv_options(parser)


def _setup(args: argparse.Namespace):
    for name in ("repeats", "batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be at least 0, got {args.warmup}")
    _check_threads_and_csv(args)
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
    if count is None:  # left alone: setting even the same count changes how later float sums round
        yield
        return
    previous = torch.get_num_threads()
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
    with _threads(args.threads):
        threads = torch.get_num_threads()
        rows = bench_op(shapes, backends, device, dtype, args.padding, args.repeats, args.warmup, not args.no_memory,
                        baseline=not args.no_baseline)
    _report(rows, OP_COLUMNS, args.csv,
            f"BRA op, {args.dtype}, padding={args.padding}, {device}, {threads} threads, "
            f"median of {args.repeats} interleaved rounds (ms; speedup = original / backend)")
    return 0


def _require_linux(kind: str) -> None:
    """UserError off Linux: the memory benchmarks read /proc/self/status and getrusage's KiB."""
    if not sys.platform.startswith("linux"):
        raise UserError(f"bench {kind} reads /proc/self/status and getrusage's KiB: it runs on Linux only")


def _check_frames(frames: int | None) -> None:
    if frames is not None and frames < 2:
        raise UserError(f"--frames must be at least 2 (clip models merge frame pairs), got {frames}")


def _kind_mismatch(model: str, frames: int | None, error: RuntimeError) -> str:
    """The message for a model given the other kind of input (a clip to an image model, or the reverse)."""
    return (f"{model} cannot take {'clips' if frames else 'images'} of this size: {str(error).splitlines()[0]}; "
            "measure image and clip models (--frames) apart")


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
    _check_frames(args.frames)
    with _threads(args.threads):
        threads = torch.get_num_threads()
        try:
            rows = bench_models(models, device, dtype, args.batch, args.img_size, args.repeats, args.warmup,
                                train=not args.no_train, memory=not args.no_memory, flops=flops, frames=args.frames)
        except RuntimeError as error:  # a clip to an image model, or an image to a clip model
            if isinstance(error, torch.OutOfMemoryError):
                raise
            raise UserError(_kind_mismatch("a model", args.frames, error)) from None
    clip = f"clips of {args.frames} frames " if args.frames else ""
    _report(rows, MODEL_COLUMNS, args.csv,
            f"models at {clip}{args.img_size}x{args.img_size}, batch {args.batch}, {args.dtype}, {device}, "
            f"{threads} threads, median of {args.repeats} interleaved rounds")
    return 0


def run_kernels(args: argparse.Namespace) -> int:
    if args.csv:
        check_writable(args.csv, "--csv")
    missing = kernels_bench.missing_compiler()
    if missing:
        raise UserError(f"bench kernels: {missing}")
    rows = kernels_bench.kernel_rows(tuple(args.backends), tuple(getattr(torch, d) for d in args.dtypes))
    _report(rows, kernels_bench.COLUMNS, args.csv,
            "Triton attention kernels compiled offline for sm_90 (nothing ran): BiFormer-S stages at 224 px; "
            "useful_fraction = valid / computed score entries of the forward")
    return 0


def run_trace(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    if args.img_size < 32:
        raise UserError(f"--img-size must be at least 32, got {args.img_size}")
    _check_frames(args.frames)
    for option in ("json", "csv"):
        if getattr(args, option):
            check_writable(getattr(args, option), f"--{option}")
    try:
        entries = [ModelEntry.parse(text) for text in args.models or trace_bench.DEFAULT_MODELS]
        models = build_models(entries, torch.device("cpu"))
    except (ValueError, OSError) as error:
        raise UserError(str(error)) from None
    rows, traces = [], {}
    for entry, model in models.items():
        for mode in args.mode:
            try:
                trace = trace_bench.trace_model(model, mode, args.batch, args.img_size, getattr(torch, args.dtype),
                                                entry.backend, fused_sdpa=not args.unfused_sdpa, frames=args.frames)
            except RuntimeError as error:  # a clip to an image model, or an image to a clip model
                raise UserError(_kind_mismatch(entry.label, args.frames, error)) from None
            rows.append(trace_bench.summary_row(entry.label, mode, trace, trace_bench.bra_layers(model)))
            traces[f"{entry.label} {mode}"] = trace_bench.as_json(trace)
    _report(rows, trace_bench.COLUMNS, args.csv,
            f"CUDA work traced on fake tensors (no GPU, nothing timed): "
            f"{f'clips of {args.frames} frames ' if args.frames else ''}{args.img_size}x{args.img_size}, batch "
            f"{args.batch}, {args.dtype} autocast; GB read+written, GFLOP = 1e9 floating-point operations")
    if args.json:
        settings = {"batch": args.batch, "img_size": args.img_size, "frames": args.frames, "dtype": args.dtype,
                    "fused_sdpa": not args.unfused_sdpa}
        with atomic_output(args.json) as temp:
            temp.write_text(json.dumps({"settings": settings, "traces": traces}, indent=1))
        print(f"wrote {args.json}")
    return 0


def _segmentation_input(text: str, case: str) -> tuple[int, int, int, int]:
    try:
        batch, height, width = (int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--input {text!r}: expected B,H,W, three integers (e.g. 1,512,1024)") from None
    multiple = 32 if case == "inference" else 1  # the segmentation models take multiples of their stride
    if batch < 1 or min(height, width) < 32 or height % multiple or width % multiple:
        raise UserError(f"--input {text!r}: need B >= 1 and H, W >= 32" + " and multiples of 32" * (multiple > 1))
    return batch, 3, height, width


def _check_segmentation_model(name: str, case: str) -> None:
    import timm

    from ..dense import is_segmentation_model

    if case == "inference" and not is_segmentation_model(name):
        raise UserError(f"--model {name!r} is no segmentation model; use HEAD_BACKBONE, e.g. upernet_biformer_small")
    if case == "training" and not (name.startswith("biformer") and timm.is_model(name)):
        raise UserError(f"--model {name!r} is no BiFormer variant; use e.g. biformer_tiny or biformer_small")


def run_volumes(args: argparse.Namespace) -> int:
    from ..benchmarks import volumes as volumes_bench

    _require_linux("volumes")
    _check_threads_and_csv(args)
    if args.repeats < 1 or min(args.sides) < 64 or any(side % 32 for side in args.sides):
        raise UserError("--repeats must be at least 1, and --sides multiples of 32 of at least 64 (SwinUNETR takes "
                        "multiples of 32; the decoders' deepest maps need more than one voxel)")
    from ..dense.volumes import monai_blocks

    monai_blocks()  # the extra's message, before any child starts
    models = args.models or list(volumes_bench.DEFAULT_MODELS)
    try:
        for model in models:
            volumes_bench.check_name(model)
        rows = volumes_bench.bench_volumes(models, args.sides, args.modes, args.repeats, args.threads)
    except ValueError as error:
        raise UserError(str(error)) from None
    except RuntimeError as error:  # a child failed: the first line names the case, the last says why
        lines = str(error).strip().splitlines()
        raise UserError(f"{lines[0]} {lines[-1]}") from None
    _report(rows, volumes_bench.COLUMNS, args.csv,
            f"3-D segmentation on CPU, batch 1, {rows[0]['threads']} threads, each case in a fresh process; "
            "MB = 2**20 bytes")
    return 0


def run_segmentation(args: argparse.Namespace) -> int:
    _require_linux("segmentation")
    if args.case == "all" and (args.model or args.input):
        raise UserError("--model and --input apply to one case: add --case inference or --case training")
    _check_threads_and_csv(args)
    if args.model:
        _check_segmentation_model(args.model, args.case)
    shape = _segmentation_input(args.input, args.case) if args.input else None
    rows = segmentation_bench.bench_segmentation(segmentation_bench.default_cases(args.case, args.model, shape), args.threads)
    _report(rows, segmentation_bench.COLUMNS, args.csv,
            f"segmentation on CPU, {rows[0]['threads']} threads, each case in a fresh process; MB = 2**20 bytes")
    if any(row["backend"] == segmentation_bench.ORIGINAL for row in rows):
        print("backend original: the release's gather algorithm, which a user of the original code measured at "
              "5.8 GB over its loaded model")
    return 0


def run_export(args: argparse.Namespace) -> int:
    _check_threads_and_csv(args)
    if args.img_size < 32:
        raise UserError(f"--img-size must be at least 32, got {args.img_size}")
    try:
        if args.profile:
            rows = export_bench.profile_onnx(args.profile, args.batches[0], args.img_size, args.threads)
            _report(rows, export_bench.PROFILE_COLUMNS, args.csv,
                    f"{args.profile} in ONNX Runtime, batch {args.batches[0]}, {args.img_size}x{args.img_size}, "
                    f"{args.threads} threads: kernel time by operator type, per run")
            return 0
        with _threads(args.threads):  # eager PyTorch's, as many as ONNX Runtime's
            rows = export_bench.bench_export(args.models or list(export_bench.DEFAULT_MODELS), tuple(args.batches),
                                             args.img_size, args.threads, args.rounds, args.warmup, args.keep)
    except ValueError as error:
        raise UserError(f"bench export: {error}") from None
    _report(rows, export_bench.COLUMNS, args.csv,
            f"exported (dynamo ONNX, fixed size) at {args.img_size}x{args.img_size} on CPU, {args.threads} threads: "
            f"ms per batch, median and range of {args.rounds} interleaved rounds")
    return 0


def run_deploy(args: argparse.Namespace) -> int:
    _check_threads_and_csv(args)
    if args.img_size < 32:
        raise UserError(f"--img-size must be at least 32, got {args.img_size}")
    names = args.models or list(deploy_bench.DEFAULT_MODELS)
    if args.reference not in names:
        raise UserError(f"--reference {args.reference} is not among the models timed ({', '.join(names)}): add it "
                        f"to them or choose one of them")
    if "openvino" in args.runtimes:
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise UserError("--runtimes openvino needs OpenVINO: pip install 'biformer[openvino]' (or leave it "
                            "out of --runtimes)") from None
    try:
        with _threads(args.threads):
            rows = deploy_bench.bench_deploy(names, tuple(args.runtimes), tuple(args.batches), args.img_size,
                                             args.threads, args.rounds, args.warmup, args.reference)
    except ValueError as error:
        raise UserError(f"bench deploy: {error}") from None
    _report(rows, deploy_bench.COLUMNS, args.csv,
            f"{args.img_size}x{args.img_size} on CPU, {args.threads} threads: ms per batch, median and range of "
            f"{args.rounds} interleaved rounds; vs_reference: {args.reference}'s ms over the model's")
    return 0


def run_detection(args: argparse.Namespace) -> int:
    _require_linux("detection")
    _check_threads_and_csv(args)
    if args.rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {args.rounds}")
    if min(args.size) < 32:
        raise UserError(f"--size {args.size[0]} {args.size[1]}: H and W must be at least 32")
    names = args.models or list(detection_bench.DEFAULT_MODELS)
    try:
        for name in names:
            detection_bench.check_model_name(name)
    except ValueError as error:
        raise UserError(f"bench detection: {error}") from None
    rows = detection_bench.bench_detection(names, tuple(args.size), args.rounds, args.threads,
                                           progress=lambda text: print(text, file=sys.stderr, flush=True))
    _report(rows, detection_bench.COLUMNS, args.csv,
            f"detection on CPU, batch 1, {rows[0]['threads']} threads; memory: each case in a fresh process "
            f"(MB = 2**20 bytes); images/s: median of {args.rounds} interleaved rounds")
    return 0


def run_yolo(args: argparse.Namespace) -> int:
    from ..benchmarks import yolo as yolo_bench

    _check_threads_and_csv(args)
    require_integration()
    models = args.models or list(yolo_bench.DEFAULT_MODELS)
    with _threads(args.threads):
        rows = yolo_bench.bench_yolo(models, args.seeds, args.epochs, args.img_size, args.batch, args.output,
                                     rounds=args.rounds)
    _report(rows, yolo_bench.COLUMNS, args.csv,
            f"YOLO on digit-scenes, trained from scratch on CPU: {args.epochs} epochs at {args.img_size} px, batch "
            f"{args.batch}, seeds {' '.join(map(str, args.seeds))} (mAP of the last epoch: median, range); size "
            f"and CPU latency at 640x640, batch 1, {torch.get_num_threads()} threads")
    return 0
