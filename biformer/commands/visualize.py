"""`biformer visualize`: draw the regions a query routes to and its token attention, for one block."""
from __future__ import annotations

import argparse

import torch

from ..errors import UserError
from ..files import check_writable
from ._options import HelpFormatter

DEFAULT_MODEL = "biformer_tiny"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "visualize", help="picture of BRA routing and token attention for chosen queries",
        formatter_class=HelpFormatter,
        description="Top row: the input with the query, the regions it routes to (the rest dimmed) and its "
                    "token attention; below: the attention of a grid of queries (or of every --query given). "
                    "Works with random weights or a checkpoint (original or our layout).",
    )
    parser.add_argument("--model", default=None,
                        help=f"biformer_* model name (default: the checkpoint's, else {DEFAULT_MODEL})")
    parser.add_argument("--checkpoint", default=None,
                        help="our trainer's .safetensors, or a .pth/.safetensors with --model (default: random, --seed)")
    parser.add_argument("--image", default="skimage:astronaut",
                        help="image file or bundled sample: skimage:astronaut, skimage:chelsea, skimage:coffee, ..., "
                             "or digits:N (a digit of the main job's data set)")
    parser.add_argument("--query", type=int, nargs=2, metavar=("X", "Y"), action="append", required=True,
                        help="query pixel of the model input; repeat for several (the first is drawn on top)")
    parser.add_argument("--block", default="2.-1",
                        help="STAGE.BLOCK (0-based, negative from the end); default: last block of stage 3")
    parser.add_argument("--img-size", type=int, nargs="+", metavar="N", default=None,
                        help="model input H W (one value: square); default: the checkpoint's or model's input size")
    parser.add_argument("--grid", type=int, default=3, help="with one --query, also draw a GRID x GRID query grid")
    parser.add_argument("--panel-size", type=int, default=256, help="approximate panel size in pixels")
    parser.add_argument("--padding", choices=("masked", "legacy"), default="masked",
                        help="how maps that are no multiple of the region count are padded: masked keys, or the "
                             "original's zero padding")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.set_defaults(run=run)


def _parse_block(text: str) -> tuple[int, int]:
    try:
        stage, block = (int(part) for part in text.split("."))
    except ValueError:
        raise UserError(f"--block must be STAGE.BLOCK, e.g. 2.-1, got {text!r}") from None
    return stage, block


def run(args: argparse.Namespace) -> int:
    import timm

    from ..analysis import visualize as vis
    from ..tasks.classification import ClassificationTask
    from ..tasks.registry import task_for_checkpoint

    stage, block = _parse_block(args.block)
    if not args.output.lower().endswith(".png"):
        raise UserError(f"--output must name a .png file, got {args.output!r}")
    check_writable(args.output, "--output")
    if args.img_size is not None and (len(args.img_size) not in (1, 2) or min(args.img_size) < 32):
        raise UserError(f"--img-size takes one or two sizes of at least 32 (H W), got {args.img_size}")
    if args.grid < 0 or args.panel_size < 1:
        raise UserError("--grid must be >= 0 and --panel-size >= 1")
    if args.model is not None and (not args.model.startswith("biformer") or not timm.is_model(args.model)):
        raise UserError(f"--model must be a BiFormer: {', '.join(timm.list_models('biformer*'))}; got {args.model!r}")
    try:
        image = vis.load_image(args.image)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from error

    torch.manual_seed(args.seed)
    if args.checkpoint:  # our trainer's files name their model and preprocessing; others need --model
        task, metadata, model_name = task_for_checkpoint(args.checkpoint, args.model)
        if not isinstance(task, ClassificationTask):
            raise UserError(f"--checkpoint {args.checkpoint!r} holds a {task.name} model; visualize draws a "
                            "classifier's BRA blocks (biformer_*)")
        loaded = task.restore(args.checkpoint, metadata, model_name, padding=args.padding)
        model, model_name, mean, std = loaded.model, loaded.model_name, loaded.mean, loaded.std
        default_size = (loaded.img_size, loaded.img_size)
    else:
        model_name = args.model or DEFAULT_MODEL
        model = timm.create_model(model_name, padding=args.padding).eval()
        cfg = model.pretrained_cfg
        mean, std, default_size = cfg["mean"], cfg["std"], cfg["input_size"][1:]
    size = tuple(args.img_size * 2 if args.img_size and len(args.img_size) == 1 else args.img_size or default_size)
    for x, y in args.query:
        if not (0 <= x < size[1] and 0 <= y < size[0]):
            raise UserError(f"--query {x} {y} lies outside the {size[1]}x{size[0]} (W x H) model input")
    try:
        layer = vis.bra_block(model, stage, block)
    except ValueError as error:
        raise UserError(str(error)) from error
    stage_index = stage % len(model.stages)
    stride = model.feature_info[stage_index]["reduction"]
    pixels, inputs = vis.preprocess(image, size, mean, std)
    record = vis.capture_routing(model, inputs, layer)
    queries = [tuple(q) for q in args.query]
    grid = queries[1:] if len(queries) > 1 else vis.grid_queries(size, args.grid)
    block_index = block % len(model.stages[stage_index].blocks)
    caption = f"stage {stage_index + 1} block {block_index + 1}"  # short enough for a 224-pixel panel
    title = f"{model_name} {caption}" + ("" if args.checkpoint else " (random weights)")
    figure = vis.render_figure(pixels, record, stride, queries[0], grid, caption, args.panel_size)
    vis.save_png(figure, args.output)
    regions = record.routing.grid
    routed = vis.query_view(record, queries[0], stride, size).routed
    print(f"{title}: {regions.rows}x{regions.cols} regions of {regions.region_h}x{regions.region_w} tokens "
          f"(stride {stride}); query {queries[0]} routes to regions {routed}")
    print(f"wrote {args.output} ({figure.width}x{figure.height})")
    return 0
