"""`biformer yolo ...`: Ultralytics' own `yolo` command line with BiFormer's blocks registered first."""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError

EXAMPLE = "biformer yolo train model=yolov8n-bra.yaml data=digit-scenes epochs=10 imgsz=128"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "yolo", help="Ultralytics YOLO (train, val, predict, export) with BRA blocks available",
        description="Runs Ultralytics' `yolo` command line (the optional extra: pip install 'biformer[ultralytics]') "
                    "with BiFormer's blocks registered, so that a YAML may name BRABlock, C2fBRA, C3k2BRA or "
                    "BiLevelRoutingAttention. model=<ultralytics YAML>-bra[-where...].yaml (where: sppf, neck, p3, "
                    "p4, p5; default sppf and neck), if no such file exists, is generated from the installed "
                    "ultralytics' own YAML into the biformer cache; data=digit-scenes is the embedded scenes in the "
                    f"YOLO layout. Example: {EXAMPLE}",
    )
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="ultralytics' arguments: MODE key=value ...")
    parser.set_defaults(run=run)


def resolve_arguments(arguments: list[str]) -> list[str]:
    """`model=` and `data=` values that biformer provides, replaced by the paths of the files it writes for them."""
    resolved = []
    for argument in arguments:
        key, _, value = argument.partition("=")
        if key == "model":
            from ..integrations.ultralytics import model_file

            value = model_file(value)
        elif key == "data" and value == "digit-scenes":
            from ..data.yolo import digit_scenes_yolo

            value = str(digit_scenes_yolo())
        resolved.append(f"{key}={value}" if "=" in argument else argument)
    return resolved


def require_integration() -> None:
    """Import (and so register) the YOLO integration; UserError naming the install if ultralytics is missing."""
    try:
        import biformer.integrations.ultralytics  # noqa: F401
    except ImportError as error:
        raise UserError(str(error)) from error


def run(args: argparse.Namespace) -> int:
    require_integration()
    from ultralytics.cfg import entrypoint

    arguments = resolve_arguments(args.arguments)
    saved = sys.argv[:]
    sys.argv[:] = ["yolo", *arguments]  # in place: ultralytics reads the list it imported as its ARGV
    try:
        entrypoint()
    finally:
        sys.argv[:] = saved
    return 0
