"""`biformer export`: a model as an ONNX file, a TorchScript trace or a torch.export program, checked against eager
PyTorch before the file appears."""
from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from ..errors import UserError
from ._options import HelpFormatter, positive

if TYPE_CHECKING:
    from torch import nn

    from ..export import ExportSettings
    from ..tasks.base import Task

DEFAULT_SIDE = 224  # the input side without --img-size or a checkpoint's training size

FORMAT_HELP = ("onnx: the dynamo exporter (--legacy: the TorchScript-based one that Ultralytics and mmdeploy use), "
               "run by ONNX Runtime to check it; torchscript: torch.jit.trace (for pnnx, coremltools); exported: "
               "torch.export.save (for ExecuTorch, AOTInductor); timm: a folder in timm's hub format (config.json, "
               "model.safetensors, a model card) that timm.create_model('local-dir:FOLDER') loads, for classifiers. "
               "Default: from the output's suffix (.onnx, .pt or .ts, .pt2)")
HUB_FORMAT = "timm"


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..export import FORMATS

    parser = subparsers.add_parser(
        "export", help="export a model to ONNX, TorchScript or torch.export",
        formatter_class=HelpFormatter,
        description="Export a model (from a checkpoint, or a bare --model with random weights) for deployment. The "
                    "file takes normalised images (B, 3, H, W), as the model in PyTorch does (clip models (B, 3, T, H, "
                    "W), volume models (B, C, D, H, W); MONAI's volume networks at a fixed size only). Before it "
                    "appears, it "
                    "is loaded back and run beside eager PyTorch on the export size and, with --dynamic, on another "
                    "batch at sides not divisible by 32 and on a small input (maps smaller than the 7x7 regions); "
                    "a difference beyond 1e-4 (max abs, scaled by outputs above 1) is an error and leaves no file. "
                    "With --dynamic, every format gives one file for every batch and size: torch.export's "
                    "symbolic sizes, or a trace that follows the sizes BRA computes from its input.",
    )
    parser.add_argument("output", help="the file to write (atomically)")
    parser.add_argument("--checkpoint", default=None, help=".safetensors from `biformer train`, or a release .pth "
                                                           "with --model")
    parser.add_argument("--model", default=None, help="model name (read from our checkpoints when omitted); "
                                                      "without --checkpoint: random weights")
    parser.add_argument("--format", choices=(*FORMATS, HUB_FORMAT), default=None, help=FORMAT_HELP)
    parser.add_argument("--license", default=None,
                        help="--format timm: the licence the model card states (default: mit, the project's; the "
                             "weights' own licence is yours to state)")
    parser.add_argument("--legacy", action="store_true", help="ONNX: the TorchScript-based exporter (traces)")
    parser.add_argument("--dynamic", action="store_true",
                        help="batch, height and width free (a clip's frames and a volume's depth too; every format)")
    parser.add_argument("--img-size", type=positive, nargs="+", default=None, metavar="SIDE",
                        help="input height and width (one value: square; a volume model's: D H W, or one value for "
                             "a cube); default: the checkpoint's training size (crop), else 224 (volumes: 96)")
    parser.add_argument("--frames", type=positive, default=None,
                        help="a clip model's frames (default: its checkpoint's, else its reference clip's; free with --dynamic)")
    parser.add_argument("--batch", type=positive, default=1, help="the example's batch (the file's, unless --dynamic)")
    parser.add_argument("--opset", type=positive, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--backbone", action="store_true",
                        help="export the dense backbone of a BiFormer classifier: its four feature maps "
                             "(strides 4, 8, 16, 32) as the outputs")
    parser.set_defaults(run=run)


def _size(args: argparse.Namespace, default: int) -> tuple[int, int]:
    sizes = args.img_size or [default]
    if len(sizes) > 2:
        raise UserError(f"--img-size takes H and W (or one value for both), got {len(sizes)} values")
    return sizes[0], sizes[-1]


def _resolve(args: argparse.Namespace) -> tuple[Task, str, dict | None]:
    """(task, model name, the checkpoint's metadata or None) of the model to export."""
    from ..tasks.registry import task_for_checkpoint, task_for_model

    if args.checkpoint is None and args.model is None:
        raise UserError("pass --checkpoint FILE (and --model for a release file) or --model NAME")
    if args.checkpoint is not None:
        task, metadata, name = task_for_checkpoint(args.checkpoint, args.model)
        return task, name, metadata
    return task_for_model(args.model), args.model, None


def _volume_sides(args: argparse.Namespace, task: Task, name: str, metadata: dict | None) -> tuple[int, int, int]:
    """(D, H, W) of a volume model's export: --img-size's D H W or cube side, else its checkpoint's crop, else the
    task's reference; UserError before the model is built for sizes it cannot take."""
    from ..dense.volumes import check_volume_sides
    from ..export import MAX_SIDE, MIN_DYNAMIC_SIDE

    sizes = args.img_size or [metadata["img_size"] if metadata else task.reference_size(name)]
    if len(sizes) not in (1, 3):
        raise UserError(f"--img-size of a volume model takes D H W (or one value for a cube), got {len(sizes)} values")
    sides = (sizes[0], sizes[len(sizes) // 2], sizes[-1])
    # a volume padded to 32 voxels per side leaves the decoder's deepest norm one voxel, where it needs two
    if min(sides[1:]) < MIN_DYNAMIC_SIDE or max(sides) > MAX_SIDE:
        raise UserError(f"--img-size {' '.join(map(str, sides))}: a volume's height and width must be within "
                        f"{MIN_DYNAMIC_SIDE}..{MAX_SIDE} voxels and its depth at most {MAX_SIDE}; choose a size in "
                        "range")
    check_volume_sides(name, sides, "--img-size")
    return sides


def _model(args: argparse.Namespace, settings: ExportSettings, task: Task, name: str, metadata: dict | None
           ) -> tuple[nn.Module, int, int | None]:
    """(the model to export, its default input side, a clip model's default frames (None: it takes images or
    volumes)); UserError if its task cannot export with `settings`. A model that resizes its input (a detector) is
    built for --img-size's shorter side."""
    reasons = [] if args.backbone else task.export_not_supported_reasons(settings)
    if reasons:
        raise UserError("; ".join(reasons))
    if task.input_noun == "volume":
        model = (task.restore(args.checkpoint, metadata, name).model if metadata is not None
                 else task.untrained_model(name, task.reference_size(name)))
        return task.deployable(model), task.reference_size(name), None
    side = min(_size(args, 0)) if args.img_size else None
    if args.backbone:
        from ..dense import create_backbone

        if task.name != "classification" or not name.startswith("biformer"):
            raise UserError(f"--backbone needs a BiFormer classifier (biformer_tiny, ...), got {task.name} model "
                            f"{name!r}")
        return create_backbone(name, checkpoint=args.checkpoint).eval(), DEFAULT_SIDE, None
    frames = task.reference_frames(name) if task.input_noun == "clip" else None
    if metadata is not None:
        restored = task.restore(args.checkpoint, metadata, name, side)
        return task.deployable(restored.model), restored.img_size, frames and metadata.get("frames", frames)
    return task.deployable(task.untrained_model(name, side or DEFAULT_SIDE)), DEFAULT_SIDE, frames


def _check_volume_options(args: argparse.Namespace, settings: ExportSettings, name: str) -> None:
    """UserError for what a volume model's export cannot take."""
    from ..dense.volumes import is_monai_volume_model, volume_side_multiple

    given = [flag for flag, value in (("--backbone", args.backbone), ("--frames", args.frames is not None)) if value]
    if given:
        raise UserError(f"{' and '.join(given)}: not for volume models ({name}); leave "
                        f"{'it' if len(given) == 1 else 'them'} out (--img-size D H W sizes a volume)")
    if settings.dynamic and is_monai_volume_model(name):
        raise UserError(f"MONAI's {name} takes only sides that are multiples of {volume_side_multiple(name)} (ours "
                        "pad): export it at a fixed size, without --dynamic")


def run_hub_folder(args: argparse.Namespace) -> int:
    """--format timm: a classifier's weights file as a hub folder."""
    from ..hub import DEFAULT_LICENSE, check_hub_target, write_hub_folder
    from ..tasks.registry import restore

    given = [flag for flag, value in (("--legacy", args.legacy), ("--dynamic", args.dynamic), ("--opset", args.opset),
                                      ("--frames", args.frames), ("--backbone", args.backbone),
                                      ("--batch", args.batch != 1)) if value]
    if given:
        raise UserError(f"{', '.join(given)} shape a traced file; --format timm writes the weights and their "
                        f"configuration: leave {'it' if len(given) == 1 else 'them'} out")
    if args.checkpoint is None:
        raise UserError("--format timm writes a trained classifier: pass --checkpoint FILE (from `biformer train`)")
    check_hub_target(args.output)  # before the model is built
    restored = restore(args.checkpoint, args.model, min(_size(args, 0)) if args.img_size else None)
    card = write_hub_folder(restored, args.output, args.license or DEFAULT_LICENSE)
    print(f"{args.output}: timm hub folder ({card.model_name}, {len(card.classes)} classes, {card.img_size} px); "
          f"load it with timm.create_model('local-dir:{args.output}', pretrained=True) after import biformer")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..export import MIN_DYNAMIC_SIDE, MIN_SIDE, ExportSettings, Volume, check_size, export, format_for_path
    from ..files import check_writable

    if args.format == HUB_FORMAT:
        return run_hub_folder(args)
    if args.license is not None:
        raise UserError("--license is for --format timm (the model card states it)")
    settings = ExportSettings(format_for_path(args.output, args.format), args.dynamic, args.legacy, args.opset)
    reasons = settings.not_supported_reasons()
    if reasons:
        raise UserError("; ".join(reasons))
    task, name, metadata = _resolve(args)
    volume_sides = None
    if task.input_noun == "volume":
        _check_volume_options(args, settings, name)
        volume_sides = _volume_sides(args, task, name, metadata)  # before the model is built
    elif args.img_size:
        check_size(*_size(args, 0), MIN_DYNAMIC_SIDE if settings.dynamic else MIN_SIDE)  # before the model is built
    check_writable(args.output, "output")
    model, default_side, frames = _model(args, settings, task, name, metadata)
    if volume_sides is not None:
        depth, height, width = volume_sides
        volume = Volume(model.in_channels, depth)
    else:
        (height, width), volume = _size(args, default_side), None
    if frames is not None:
        frames = args.frames or frames
        if frames < 2:
            raise UserError(f"--frames must be at least 2 (a clip model's stem merges frame pairs), got {frames}")
    elif args.frames is not None:
        raise UserError("--frames is for clip models (biformer3d_*, swin3d_t, ...); this model takes images")
    start = time.perf_counter()
    checks, sizes = export(model, args.output, settings, height, width, batch=args.batch,
                           on_stage=lambda text: print(f"{text} ...", flush=True), frames=frames, volume=volume)
    for check in checks:
        print(f"  {check}")
    print(f"{args.output}: {settings.format}{' (legacy exporter)' if settings.legacy else ''}, {sizes}, written in "
          f"{time.perf_counter() - start:.0f} s")
    return 0
