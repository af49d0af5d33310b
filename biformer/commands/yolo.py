"""`biformer yolo ...`: Ultralytics' own `yolo` command line with BiFormer's blocks registered first."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    from ..data.scenes import cache_root

    resolved = []
    for argument in arguments:
        key, _, value = argument.partition("=")
        if key == "model" and value.endswith(".yaml") and not Path(value).exists():
            from ..integrations.ultralytics import GENERATED_NAME, write_bra_yaml

            if GENERATED_NAME.match(Path(value).name):
                folder = cache_root() / "yolo-models"
                folder.mkdir(parents=True, exist_ok=True)
                value = str(write_bra_yaml(Path(value).name, folder))
        elif key == "data" and value == "digit-scenes":
            from ..data.yolo import digit_scenes_yolo

            value = str(digit_scenes_yolo())
        resolved.append(f"{key}={value}" if "=" in argument else argument)
    return resolved


def run(args: argparse.Namespace) -> int:
    try:
        import biformer.integrations.ultralytics  # noqa: F401  (registers the blocks)
        from ultralytics.cfg import entrypoint
    except ImportError as error:
        raise UserError(str(error)) from error
    arguments = resolve_arguments(args.arguments)
    saved = sys.argv[:]
    sys.argv[:] = ["yolo", *arguments]  # in place: ultralytics reads the list it imported as its ARGV
    try:
        entrypoint()
    finally:
        sys.argv[:] = saved
    return 0
