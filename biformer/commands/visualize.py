"""`biformer visualize`: draw the regions a query routes to and its token attention, for one block: on an image,
or across the frames of a clip."""
from __future__ import annotations

import argparse

import torch

from ..errors import UserError
from ..files import check_writable
from ._options import HelpFormatter

DEFAULT_MODEL = "biformer_tiny"
DEFAULT_IMAGE = "skimage:astronaut"
DEFAULT_CLIP = "moving-digits:0"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "visualize", help="picture of BRA routing and token attention for chosen queries",
        formatter_class=HelpFormatter,
        description="Top row: the input with the query, the regions it routes to (the rest dimmed) and its "
                    "token attention; below: the attention of a grid of queries (or of every --query given). For a "
                    "clip model (biformer3d_*, --clip, --frame): per time step of the block, the regions the query "
                    "routes to there and its attention. Works with random weights or a checkpoint (original or our "
                    "layout).",
    )
    parser.add_argument("--model", default=None,
                        help=f"biformer_* model name (default: the checkpoint's, else {DEFAULT_MODEL})")
    parser.add_argument("--checkpoint", default=None,
                        help="our trainer's .safetensors, or a .pth/.safetensors with --model (default: random, --seed)")
    parser.add_argument("--image", default=None,
                        help=f"image file or bundled sample: skimage:astronaut, skimage:chelsea, skimage:coffee, ..., "
                             f"or digits:N (a digit of the main job's data set); default: {DEFAULT_IMAGE}")
    parser.add_argument("--clip", default=None,
                        help=f"clip models (biformer3d_*): a video file, a folder of frames, or moving-digits:N "
                             "(a validation clip of the moving digits); the frames sampled as the model was trained; default: "
                             f"{DEFAULT_CLIP}")
    parser.add_argument("--frame", type=int, default=None,
                        help="clip models: the frame of the --query pixel (0-based, of the sampled frames)")
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
    from ..analysis import visualize as vis

    torch.manual_seed(args.seed)
    loaded = _load_model(args)
    clip = loaded["task"] == "video"
    if (args.image if clip else args.clip) is not None:
        raise UserError(f"{'--image' if clip else '--clip'} is for {'image' if clip else 'clip'} models; "
                        f"{loaded['name']} takes {'clips: give --clip' if clip else 'images: give --image'}")
    args.clip = args.clip or (DEFAULT_CLIP if clip else None)
    if clip and (len(args.query) > 1 or args.frame is None):
        raise UserError("a clip model draws one query: give one --query X Y and --frame T (the query's frame)")
    if not clip and args.frame is not None:
        raise UserError("--frame is for clip models (biformer3d_*): an image has one")
    size = tuple(args.img_size * 2 if args.img_size and len(args.img_size) == 1 else args.img_size or loaded["size"])
    for x, y in args.query:
        if not (0 <= x < size[1] and 0 <= y < size[0]):
            raise UserError(f"--query {x} {y} lies outside the {size[1]}x{size[0]} (W x H) model input")
    try:
        layer = vis.bra_block(loaded["model"], stage, block)
    except ValueError as error:
        raise UserError(str(error)) from error
    model = loaded["model"]
    stage_index = stage % len(model.stages)
    caption = f"stage {stage_index + 1} block {block % len(model.stages[stage_index].blocks) + 1}"
    title = f"{loaded['name']} {caption}" + ("" if args.checkpoint else " (random weights)")
    stride = model.feature_info[stage_index]["reduction"]
    draw = _clip_figure if clip else _image_figure
    figure, summary = draw(args, loaded, layer, size, stride, caption=title if clip else caption)
    vis.save_png(figure, args.output)
    print(f"{title}: {summary}")
    print(f"wrote {args.output} ({figure.width}x{figure.height})")
    return 0


def _load_model(args: argparse.Namespace) -> dict:
    """The model to draw (a checkpoint's, else random weights) with its task's name, name, input size (H, W),
    normalization and (clip models) sampled frames and stride."""
    import timm

    from ..models.biformer import CLIP_FRAMES
    from ..tasks.registry import task_for_checkpoint, task_for_model

    if args.checkpoint:  # our trainer's files name their model and preprocessing; others need --model
        task, metadata, model_name = task_for_checkpoint(args.checkpoint, args.model)
        if task.name not in ("classification", "video") or not model_name.startswith("biformer"):
            raise UserError(f"--checkpoint {args.checkpoint!r} holds a {task.name} model ({model_name}); visualize "
                            "draws the BRA blocks of biformer_* and biformer3d_* classifiers")
        restored = task.restore(args.checkpoint, metadata, model_name, padding=args.padding)
        return {"task": task.name, "model": restored.model, "name": model_name, "mean": restored.mean,
                "std": restored.std, "size": (restored.img_size,) * 2, "frames": metadata.get("frames"),
                "frame_stride": metadata.get("frame_stride", 1)}
    model_name = args.model or DEFAULT_MODEL
    model = timm.create_model(model_name, padding=args.padding).eval()
    cfg = model.pretrained_cfg
    task = task_for_model(model_name).name
    return {"task": task, "model": model, "name": model_name, "mean": cfg["mean"], "std": cfg["std"],
            "size": tuple(cfg["input_size"][1:]), "frames": CLIP_FRAMES.get(model_name), "frame_stride": 1}


def _image_figure(args: argparse.Namespace, loaded: dict, layer, size: tuple[int, int], stride: int, caption: str):
    from ..analysis import visualize as vis

    try:
        image = vis.load_image(args.image or DEFAULT_IMAGE)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from error
    pixels, inputs = vis.preprocess(image, size, loaded["mean"], loaded["std"])
    record = vis.capture_routing(loaded["model"], inputs, layer)
    queries = [tuple(q) for q in args.query]
    grid = queries[1:] if len(queries) > 1 else vis.grid_queries(size, args.grid)
    figure = vis.render_figure(pixels, record, stride, queries[0], grid, caption, args.panel_size)
    regions = record.routing.grid
    routed = vis.query_view(record, queries[0], stride, size).routed
    return figure, (f"{regions.rows}x{regions.cols} regions of {regions.region_h}x{regions.region_w} tokens "
                    f"(stride {stride}); query {queries[0]} routes to regions {routed}")


def _clip_figure(args: argparse.Namespace, loaded: dict, layer, size: tuple[int, int], stride: int, caption: str):
    import numpy as np

    from ..analysis import visualize as vis
    from ..data.video import ClipSampling, UnreadableClip, read_frames

    try:
        frames = read_frames(_clip_path(args.clip))
    except UnreadableClip as error:
        raise UserError(f"--clip {error}") from error
    sampling = ClipSampling(loaded["frames"], loaded["frame_stride"])
    frames = [frames[i] for i in sampling.indices(len(frames), sampling.view_starts(len(frames))[0])]
    if not 0 <= args.frame < len(frames):
        raise UserError(f"--frame {args.frame} is not one of the {len(frames)} frames the model sees (0..{len(frames) - 1})")
    prepared = [vis.preprocess(frame, size, loaded["mean"], loaded["std"]) for frame in frames]
    pixels = np.stack([frame for frame, _ in prepared])  # (T, H, W, 3)
    inputs = torch.stack([tensor[0] for _, tensor in prepared], dim=1)[None]  # (1, 3, T, H, W)
    record = vis.capture_routing(loaded["model"], inputs, layer)
    tubelet = len(frames) // record.q.shape[1]
    query = (args.frame, *args.query[0])
    figure = vis.render_clip_figure(pixels, record, stride, tubelet, query, caption, args.panel_size)
    grid = record.routing.grid
    views = vis.clip_query_views(record, query, stride, tubelet, size)
    steps = "; ".join(f"frames {step * tubelet}-{(step + 1) * tubelet - 1}: {view.routed}"
                      for step, view in enumerate(views) if view.routed)
    return figure, (f"{'x'.join(map(str, grid.counts))} regions (T x H x W) of {'x'.join(map(str, grid.sizes))} "
                    f"tokens (a token: {tubelet} frames, {stride}x{stride} px); the query routes to regions {steps}")


def _clip_path(spec: str) -> str:
    """A clip file or frame folder, or the N-th validation clip of the moving digits (moving-digits:N)."""
    from ..data.video import MOVING_DIGITS_NAME, moving_digits_folder, scan_clip_folders

    prefix = f"{MOVING_DIGITS_NAME}:"
    if not spec.startswith(prefix):
        return spec

    _, clips, _ = scan_clip_folders(moving_digits_folder() / "val")
    index = spec[len(prefix):]
    if not index.isdigit() or int(index) >= len(clips):
        raise UserError(f"--clip {spec!r}: write {prefix}N with N in 0..{len(clips) - 1}")
    return str(clips[int(index)])
