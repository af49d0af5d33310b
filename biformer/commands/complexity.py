"""`biformer complexity`: the paper's FLOPs trade-off over the region count S, with measured times."""
from __future__ import annotations

import argparse

from ..analysis.complexity import (
    complexity_table,
    format_table,
    plot_complexity,
    write_csv,
)
from ..errors import UserError
from ..files import check_writable
from ._options import HelpFormatter


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "complexity", help="BRA FLOPs and time against the number of regions (paper Eq. 9)",
        formatter_class=HelpFormatter,
        description="Tabulate and plot the routing and token-attention FLOPs of one BRA layer for every S "
                    "(regions per side) that divides the map, the analytic optimum S*, and the measured "
                    "time of bi_level_routing_attention for each S.",
    )
    parser.add_argument("--size", type=int, nargs="+", metavar="N", default=(56, 56),
                        help="map size in tokens: H W for an image, T H W for a clip or volume (regions T' x S x S)")
    parser.add_argument("--dim", type=int, default=64, help="channels C")
    parser.add_argument("--topk", type=int, default=4, help="routed regions k")
    parser.add_argument("--heads", type=int, default=None, help="attention heads for the timing (default C // 32)")
    parser.add_argument("--output", default="complexity.png", help="PNG plot to write")
    parser.add_argument("--csv", default=None, help="also write the table as CSV")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per S (median reported)")
    parser.add_argument("--no-time", action="store_true", help="FLOPs only, skip the timing")
    parser.add_argument("--device", default="cpu", help="device for the timing")
    parser.add_argument("--backend", default=None, help="force a BRA backend for the timing")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    size = tuple(args.size)
    heads = args.heads or max(1, args.dim // 32)
    if len(size) not in (2, 3):
        raise UserError(f"--size takes H W (an image) or T H W (a clip or volume), got {len(size)} values")
    names = ("--size T", "--size H", "--size W")[3 - len(size):]
    for name, value in (*zip(names, size), ("--dim", args.dim), ("--topk", args.topk), ("--repeats", args.repeats),
                        ("--heads", heads)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if args.dim % heads:
        raise UserError(f"--heads {heads} must divide --dim {args.dim}")
    if not args.output.lower().endswith(".png"):
        raise UserError(f"--output must name a .png file, got {args.output!r}")
    for option, path in (("--output", args.output), ("--csv", args.csv)):
        if path:
            check_writable(path, option)
    try:
        rows = complexity_table(size, args.dim, args.topk, heads=heads, measure=not args.no_time,
                                repeats=args.repeats, device=args.device, backend=args.backend)
    except ValueError as error:  # e.g. a forced backend that cannot run
        raise UserError(str(error)) from error
    shape = "x".join(map(str, size))
    if not rows:
        raise UserError(f"no region count divides {shape} with at least topk={args.topk} regions; lower --topk or "
                        "change --size")
    print(f"BRA on a {shape} map, C={args.dim}, k={args.topk}"
          + ("" if args.no_time else f", timing {heads} heads on {args.device}"))
    print(format_table(rows, size, args.topk))
    plot_complexity(rows, size, args.dim, args.topk, args.output)
    print(f"wrote {args.output}")
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    return 0
