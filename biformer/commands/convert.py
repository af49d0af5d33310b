"""`biformer convert`: original release checkpoints <-> our layout, .pth <-> .safetensors."""
from __future__ import annotations

import argparse

from ..checkpoints.original import convert_file
from ..errors import UserError
from ..files import check_writable


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert checkpoints between the original release layout and ours",
        description="Convert a checkpoint between the original release layout ({'model': state_dict} .pth) and "
                    "ours (.safetensors), either way; values are kept bit for bit. Without --to, a .pth input "
                    "and .safetensors output converts to ours, the reverse to the original, and otherwise the "
                    "layout the input is not in. The model is inferred from the keys and shapes unless given. "
                    "Pickles are read with weights_only=True: anything but plain tensors is refused.",
    )
    parser.add_argument("input", help=".pth/.pt or .safetensors checkpoint")
    parser.add_argument("output", help=".safetensors or .pth/.pt file to write (atomically)")
    parser.add_argument("--to", choices=("original", "ours"), default=None, help="target layout")
    parser.add_argument("--model", default=None, help="biformer_* variant (default: inferred)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_writable(args.output, "output")
    try:
        model, source, target = convert_file(args.input, args.output, to=args.to, model_name=args.model)
    except FileNotFoundError as error:
        raise UserError(str(error)) from error
    print(f"{args.input} ({model}, {source} layout) -> {args.output} ({target} layout)")
    return 0
