"""Pictures of routing: which regions a query attends to, and its token-level attention.

The figure is composed with PIL at exact pixel positions (see `panel_origin`), so what is drawn
where can be checked: row 0 holds the input with the query marked, the routed regions (full
colour, outlined; the rest dimmed) and the token attention heatmap; the rows below hold the
heatmap for a grid of queries, like the paper's figure of the last block of stage 3; a colour scale
closes the figure.

Coordinates: queries are (x, y) pixels of the model input (the image resized to the input size);
a token of a stage with stride s covers s x s input pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw
from torch import Tensor, nn

from ..data.images import open_rgb
from ..files import atomic_output
from ..ops import BiLevelRoutingAttention
from ..ops.module import RecordedRouting

SKIMAGE_PREFIX = "skimage:"
DIGITS_PREFIX = "digits:"
SKIMAGE_SAMPLES = ("astronaut", "chelsea", "coffee", "camera", "cat", "rocket", "immunohistochemistry", "hubble_deep_field")
ROUTED_COLOR = (255, 196, 0)
QUERY_COLOR = (0, 200, 255)
DIM = 0.35  # brightness of what is not routed
MARGIN, TITLE_HEIGHT, COLUMNS = 8, 16, 3
SCALE_BAR_HEIGHT = 12  # the colour scale's strip; its caption takes a title's height above it
HEAT_LOW = 0.1  # where on the colour map the least routed weight of a panel sits (0 is left for unrouted tokens)


def load_image(spec: str) -> Image.Image:
    """An RGB image from a file path, a bundled scikit-image sample ('skimage:astronaut') or one of
    scikit-learn's bundled 8x8 digits ('digits:N', N in 0..1796, the data set the main job trains on)."""
    if spec.startswith(SKIMAGE_PREFIX):
        name = spec[len(SKIMAGE_PREFIX):]
        if name not in SKIMAGE_SAMPLES:
            raise ValueError(f"unknown sample {spec!r}; bundled samples: "
                             + ", ".join(SKIMAGE_PREFIX + s for s in SKIMAGE_SAMPLES) + f", {DIGITS_PREFIX}N")
        import skimage.data

        return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    if spec.startswith(DIGITS_PREFIX):
        from ..data.digits import digit_image

        index = spec[len(DIGITS_PREFIX):]
        try:
            return digit_image(int(index))
        except (ValueError, IndexError):
            raise ValueError(f"{spec!r}: write {DIGITS_PREFIX}N with N in 0..1796") from None
    try:
        return open_rgb(spec)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"image {spec!r} does not exist") from error
    except OSError as error:
        raise ValueError(f"image {spec!r} cannot be read: {error}") from error


def preprocess(image: Image.Image, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, Tensor]:
    """Resize to (H, W); return the resized uint8 (H, W, 3) image and the normalised (1, 3, H, W) input."""
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BICUBIC)
    pixels = np.array(image, dtype=np.uint8)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)
    tensor = (tensor - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return pixels, tensor[None]


def bra_block(model: nn.Module, stage: int, block: int) -> BiLevelRoutingAttention:
    """The BRA layer of model.stages[stage].blocks[block] (negative indices allowed)."""
    try:
        attention = model.stages[stage].blocks[block].attn
    except (IndexError, AttributeError) as error:
        depths = [len(s.blocks) for s in model.stages]
        raise ValueError(f"block {stage}.{block} does not exist; blocks per stage: {depths}") from error
    if not isinstance(attention, BiLevelRoutingAttention):
        raise ValueError(f"block {stage}.{block} uses {type(attention).__name__}, not routing attention; "
                         "choose a block of a BRA stage")
    return attention


def capture_routing(model: nn.Module, inputs: Tensor, layer: BiLevelRoutingAttention) -> RecordedRouting:
    """Run model on inputs and return what `layer` routed (batch element 0 is what is drawn)."""
    layer.record_routing, layer.last_routing = True, None
    try:
        with torch.no_grad():
            model(inputs)
        record = layer.last_routing
    finally:
        layer.record_routing, layer.last_routing = False, None
    if record is None:
        raise RuntimeError("the chosen layer did not run in the forward pass")
    return record


@dataclass(frozen=True)
class QueryView:
    """What one query token sees. Pixel boxes are (x0, y0, x1, y1) in input pixels, clipped to the image."""

    query: tuple[int, int]
    query_region: int
    routed: list[int]  # key region indices, best first
    attention: np.ndarray  # (H_img, W_img) float, the head-averaged attention of the query (sums to 1)
    boxes: dict[int, tuple[int, int, int, int]]  # region index -> box


def _query_attention(record: RecordedRouting, token: tuple[int, ...]) -> tuple[int, Tensor, Tensor]:
    """(the region of the query token at `token` (one index per spatial axis), the key regions it routes to (K,)
    best first, its head-averaged attention over the map's tokens (*shape), zero outside the routed regions)."""
    grid = record.routing.grid
    region = 0
    for coordinate, count, size in zip(token, grid.counts, grid.sizes):  # regions are numbered row-major
        region = region * count + coordinate // size
    routed = record.routing.indices[0, region]  # (K,)
    q_token = record.q[(0, *token)].float()  # (M, D)
    k_routed = grid.to_regions(record.k.float())[0, routed]  # (K, T, M, D)
    logits = torch.einsum("md,ktmd->mkt", q_token, k_routed) * record.scale
    valid = grid.valid_tokens(logits.device)[routed]  # (K, T)
    weights = logits.masked_fill(~valid, float("-inf")).flatten(1).softmax(-1).mean(0).view_as(valid)
    token_map = torch.zeros(grid.num_regions, grid.tokens_per_region)
    token_map[routed] = weights.cpu()
    return region, routed, grid.from_regions(token_map[None, :, :, None])[0, ..., 0]


def query_view(record: RecordedRouting, query: tuple[int, int], stride: int, image_size: tuple[int, int]) -> QueryView:
    """Routing and token attention (mean over heads) of the token under input pixel query = (x, y)."""
    grid = record.routing.grid
    x, y = query
    region, routed, token_map = _query_attention(record, (y // stride, x // stride))  # token_map: (H', W')
    # one token covers stride x stride pixels; the legacy padding beyond the image is cut off
    pixels = token_map.repeat_interleave(stride, 0).repeat_interleave(stride, 1)[: image_size[0], : image_size[1]]
    height, width = image_size

    def box(index: int) -> tuple[int, int, int, int]:
        r, c = divmod(index, grid.cols)
        y0, x0 = r * grid.region_h * stride, c * grid.region_w * stride
        return (min(x0, width), min(y0, height), min(x0 + grid.region_w * stride, width), min(y0 + grid.region_h * stride, height))

    indices = routed.tolist()
    return QueryView(query, region, indices, pixels.numpy() / stride**2,
                     {i: box(i) for i in set(indices) | {region}})


def _scaled(box: tuple[int, int, int, int], scale: int) -> tuple[int, int, int, int]:
    return tuple(v * scale for v in box)


def _outline(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], color: tuple[int, int, int], width: int) -> None:
    x0, y0, x1, y1 = box
    if x1 > x0 and y1 > y0:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=color, width=width)


def marker_radius(panel: tuple[int, int], scale: int) -> int:
    """The query marker's radius: a fortieth of the panel's long side, so that it shows on large images too."""
    return max(3, 2 * scale, max(panel) // 40)


def _marker(draw: ImageDraw.ImageDraw, query: tuple[int, int], scale: int, radius: int) -> None:
    cx, cy = (query[0] + 0.5) * scale, (query[1] + 0.5) * scale
    width = max(1, radius // 3)
    draw.ellipse((cx - radius - width, cy - radius - width, cx + radius + width, cy + radius + width), outline="black",
                 width=1)  # a dark rim: the marker shows on light and dark pixels alike
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=QUERY_COLOR, width=width)
    draw.point((cx, cy), fill=QUERY_COLOR)


def routed_regions_panel(pixels: np.ndarray, view: QueryView, scale: int, radius: int, mark: bool = True) -> Image.Image:
    """Routed regions in full colour with outlines, everything else dimmed; the query region (where the view has
    its box) outlined apart, and the query marked unless `mark` is False."""
    shown = (pixels * DIM).astype(np.uint8)
    for index in view.routed:
        x0, y0, x1, y1 = view.boxes[index]
        shown[y0:y1, x0:x1] = pixels[y0:y1, x0:x1]
    image = _upscale(shown, scale)
    draw = ImageDraw.Draw(image)
    line = max(1, scale)
    for index in view.routed:
        _outline(draw, _scaled(view.boxes[index], scale), ROUTED_COLOR, line)
    if view.query_region in view.boxes:
        _outline(draw, _scaled(view.boxes[view.query_region], scale), QUERY_COLOR, line)
    if mark:
        _marker(draw, view.query, scale, radius)
    return image


def _routed_mask(view: QueryView) -> np.ndarray:
    routed = np.zeros(view.attention.shape, dtype=bool)
    for index in view.routed:
        x0, y0, x1, y1 = view.boxes[index]
        routed[y0:y1, x0:x1] = True
    return routed


def weight_range(view: QueryView) -> tuple[float, float]:
    """The least and the largest attention weight of the query's routed tokens: what its panel's colours span."""
    weights = view.attention[_routed_mask(view)]
    return float(weights.min()), float(weights.max())


def attention_panel(pixels: np.ndarray, view: QueryView, scale: int, radius: int, mark: bool = True) -> Image.Image:
    """The query's token attention as a heatmap over the dimmed image, routed regions outlined.

    Colours span the weights' range over the routed tokens (`weight_range`), so near-uniform attention (random
    weights) still shows its structure; tokens outside the routed regions stay uncoloured.
    """
    routed = _routed_mask(view)
    low, high = weight_range(view)
    heat = np.where(routed, HEAT_LOW + (1 - HEAT_LOW) * (view.attention - low) / max(high - low, 1e-12), 0.0)
    colored = colormaps["inferno"](heat)[..., :3] * 255
    alpha = 0.25 + 0.75 * heat[..., None]
    shown = (pixels * DIM * (1 - alpha) + colored * alpha).clip(0, 255).astype(np.uint8)
    image = _upscale(shown, scale)
    draw = ImageDraw.Draw(image)
    for index in view.routed:
        _outline(draw, _scaled(view.boxes[index], scale), ROUTED_COLOR, 1)
    if mark:
        _marker(draw, view.query, scale, radius)
    return image


def colour_scale(width: int, low: float, high: float, what: str = "the first query") -> Image.Image:
    """The heatmaps' colour scale: a strip from a panel's least to its largest routed weight, captioned with the
    range of `what` (each panel spans its own)."""
    strip = colormaps["inferno"](np.linspace(HEAT_LOW, 1.0, width))[None, :, :3] * 255
    image = Image.new("RGB", (width, TITLE_HEIGHT + SCALE_BAR_HEIGHT), "white")
    image.paste(Image.fromarray(np.repeat(strip, SCALE_BAR_HEIGHT, 0).astype(np.uint8)), (0, TITLE_HEIGHT))
    ImageDraw.Draw(image).text((0, 2), f"attention weight: {low:.3g} (left) .. {high:.3g} (right) for {what}; "
                                        "each heatmap spans its own routed tokens' range", fill="black")
    return image


def _upscale(pixels: np.ndarray, scale: int) -> Image.Image:
    image = Image.fromarray(pixels)
    return image if scale == 1 else image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def display_scale(image_size: tuple[int, int], panel_size: int) -> int:
    """Integer upscaling so panels are about panel_size pixels on their long side (at least 1)."""
    return max(1, panel_size // max(image_size))


def panel_origin(row: int, col: int, panel: tuple[int, int]) -> tuple[int, int]:
    """Top-left (x, y) of the panel at (row, col) in the figure; panel = (width, height) in figure pixels."""
    return MARGIN + col * (panel[0] + MARGIN), row * (TITLE_HEIGHT + panel[1] + MARGIN) + TITLE_HEIGHT + MARGIN


def figure_size(panel: tuple[int, int], grid_queries: int) -> tuple[int, int]:
    """The panels' rows, then the colour scale."""
    rows = 1 + math.ceil(grid_queries / COLUMNS)
    return (MARGIN + COLUMNS * (panel[0] + MARGIN),
            rows * (TITLE_HEIGHT + panel[1] + MARGIN) + MARGIN + TITLE_HEIGHT + SCALE_BAR_HEIGHT + MARGIN)


def grid_queries(image_size: tuple[int, int], per_side: int) -> list[tuple[int, int]]:
    """per_side x per_side queries evenly spread over the image, as (x, y)."""
    height, width = image_size
    return [(int((j + 0.5) * width / per_side), int((i + 0.5) * height / per_side))
            for i in range(per_side) for j in range(per_side)]


def render_figure(
    pixels: np.ndarray, record: RecordedRouting, stride: int, query: tuple[int, int],
    grid: Sequence[tuple[int, int]], title: str, panel_size: int = 256,
) -> Image.Image:
    image_size = pixels.shape[:2]
    scale = display_scale(image_size, panel_size)
    panel = (image_size[1] * scale, image_size[0] * scale)
    size = figure_size(panel, len(grid))
    figure = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(figure)
    main = query_view(record, query, stride, image_size)
    radius = marker_radius(panel, scale)
    input_panel = _upscale(pixels, scale)
    _marker(ImageDraw.Draw(input_panel), query, scale, radius)
    top = [(input_panel, f"{title}, query {query}"),
           (routed_regions_panel(pixels, main, scale, radius), f"{len(main.routed)} routed regions"),
           (attention_panel(pixels, main, scale, radius), "token attention, mean of heads")]
    cells = [(attention_panel(pixels, query_view(record, q, stride, image_size), scale, radius), f"query {q}")
             for q in grid]
    for position, (panel_image, caption) in enumerate(top + cells):
        row, col = (0, position) if position < COLUMNS else (1 + (position - COLUMNS) // COLUMNS, (position - COLUMNS) % COLUMNS)
        x, y = panel_origin(row, col, panel)
        figure.paste(panel_image, (x, y))
        draw.text((x, y - TITLE_HEIGHT + 2), caption, fill="black")
    figure.paste(colour_scale(size[0] - 2 * MARGIN, *weight_range(main)),
                 (MARGIN, size[1] - MARGIN - TITLE_HEIGHT - SCALE_BAR_HEIGHT))
    return figure


def save_png(image: Image.Image, path: str) -> None:
    with atomic_output(path) as temp:
        image.save(temp, format="PNG")


# -- clips: where a query in one frame routes to, across frames ------------------------------------------------


def clip_query_views(record: RecordedRouting, query: tuple[int, int, int], stride: int, tubelet: int,
                     frame_size: tuple[int, int]) -> list[QueryView]:
    """The routing and token attention of the token under input pixel (x, y) of frame t, query = (t, x, y), as one
    QueryView per time step of the block's map (a step covers `tubelet` frames): the routed regions that reach into
    that step, and the attention on its tokens. The query's own region is named in the view of its step only."""
    grid = record.routing.grid
    t, x, y = query
    token = (t // tubelet, y // stride, x // stride)
    region, routed, token_map = _query_attention(record, token)  # token_map: (T', H', W')
    height, width = frame_size
    views = []
    for step in range(grid.shape[0]):
        pixels = token_map[step].repeat_interleave(stride, 0).repeat_interleave(stride, 1)[:height, :width]
        boxes = {}
        for index in set(routed.tolist()) | {region}:
            time_region, rest = divmod(index, grid.counts[1] * grid.counts[2])
            if not time_region * grid.sizes[0] <= step < (time_region + 1) * grid.sizes[0]:
                continue  # the region lies in other time steps
            r, c = divmod(rest, grid.counts[2])
            y0, x0 = r * grid.sizes[1] * stride, c * grid.sizes[2] * stride
            boxes[index] = (min(x0, width), min(y0, height), min(x0 + grid.sizes[2] * stride, width),
                            min(y0 + grid.sizes[1] * stride, height))
        in_step = [index for index in routed.tolist() if index in boxes]
        views.append(QueryView((x, y), region, in_step, pixels.numpy() / stride**2, boxes))
    return views


def _clip_panels(frame: np.ndarray, view: QueryView, scale: int, radius: int, mark: bool
                 ) -> tuple[Image.Image, Image.Image]:
    """A time step's routed-regions panel and attention panel; a step that nothing is routed into shows dimmed."""
    if not view.routed:
        dimmed = _upscale((frame * DIM).astype(np.uint8), scale)
        return dimmed, dimmed.copy()
    return routed_regions_panel(frame, view, scale, radius, mark), attention_panel(frame, view, scale, radius, mark)


def render_clip_figure(frames: np.ndarray, record: RecordedRouting, stride: int, tubelet: int,
                       query: tuple[int, int, int], title: str, panel_size: int = 160) -> Image.Image:
    """Row 0: per time step of the block's map, its first frame (the query's own on its step) with the regions the
    query routes to there in full colour (the rest dimmed) and the query marked on its own step; row 1: the query's token attention on
    each step; a colour scale closes the figure. frames: (T, H, W, 3) uint8, the model's input frames."""
    frame_size = frames.shape[1:3]
    views = clip_query_views(record, query, stride, tubelet, frame_size)
    scale = display_scale(frame_size, panel_size)
    panel = (frame_size[1] * scale, frame_size[0] * scale)
    columns = len(views)
    width = MARGIN + columns * (panel[0] + MARGIN)
    height = 2 * (TITLE_HEIGHT + panel[1] + MARGIN) + TITLE_HEIGHT + MARGIN + TITLE_HEIGHT + SCALE_BAR_HEIGHT + MARGIN
    figure = Image.new("RGB", (max(width, 480), height), "white")
    draw = ImageDraw.Draw(figure)
    draw.text((MARGIN, 2), f"{title}; query (x {query[1]}, y {query[2]}) in frame {query[0]}", fill="black")
    radius = marker_radius(panel, scale)
    query_step = query[0] // tubelet
    for step, view in enumerate(views):
        shown = frames[query[0]] if step == query_step else frames[step * tubelet]  # the query's own frame
        routed_panel, attention = _clip_panels(shown, view, scale, radius, step == query_step)
        first, last = step * tubelet, min((step + 1) * tubelet, len(frames)) - 1
        for row, (image, caption) in enumerate(((routed_panel, f"frames {first}-{last}: {len(view.routed)} routed"),
                                                (attention, "attention"))):
            x, y = panel_origin(row, step, panel)
            y += TITLE_HEIGHT  # below the figure's title
            figure.paste(image, (x, y))
            draw.text((x, y - TITLE_HEIGHT + 2), caption, fill="black")
    ranges = [weight_range(view) for view in views if view.routed]  # the steps' heatmaps each span their own range
    scale_strip = colour_scale(figure.width - 2 * MARGIN, min(low for low, _ in ranges), max(high for _, high in ranges),
                               "the query over all steps")
    figure.paste(scale_strip, (MARGIN, height - MARGIN - TITLE_HEIGHT - SCALE_BAR_HEIGHT))
    return figure
