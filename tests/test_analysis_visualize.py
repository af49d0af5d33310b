"""Routing pictures: the token attention of a query against a dense masked formulation, and the panels."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import biformer  # noqa: F401  (registers the models)
from biformer.analysis import visualize as vis


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return timm.create_model("biformer_nano", num_classes=10).eval()


@pytest.mark.parametrize("size", [64, 72], ids=["whole-regions", "padded"])
def test_query_attention_equals_dense_masked_attention(nano, size):
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    _, inputs = vis.preprocess(Image.fromarray(pixels), (size, size), (0.5,) * 3, (0.25,) * 3)
    layer = vis.bra_block(nano, 1, 0)
    record = vis.capture_routing(nano, inputs, layer)
    assert layer.last_routing is None and not layer.record_routing  # recording is switched off again
    stride = 8
    query = (41, 19)
    view = vis.query_view(record, query, stride, (size, size))
    # oracle: attention of the query token to every token of the map, keys outside routed regions masked
    grid = record.routing.grid
    q = record.q[0, query[1] // stride, query[0] // stride].double()  # (M, D)
    k = record.k[0].double()  # (H', W', M, D)
    rows, cols = torch.meshgrid(torch.arange(grid.height), torch.arange(grid.width), indexing="ij")
    key_region = (rows // grid.region_h) * grid.cols + cols // grid.region_w
    allowed = torch.isin(key_region, record.routing.indices[0, view.query_region])
    logits = torch.einsum("md,hwmd->mhw", q, k) * record.scale
    dense = logits.masked_fill(~allowed, float("-inf")).flatten(1).softmax(-1).mean(0).view(grid.height, grid.width)
    expected = dense.repeat_interleave(stride, 0).repeat_interleave(stride, 1)[:size, :size] / stride**2
    np.testing.assert_allclose(view.attention, expected.numpy(), atol=1e-6)
    assert view.attention.sum() == pytest.approx(1.0, abs=1e-5)
    assert len(view.routed) == layer.topk


def test_bad_block_and_sample_names(nano):
    with pytest.raises(ValueError, match="not routing attention"):
        vis.bra_block(nano, 3, 0)  # the last stage is full attention
    with pytest.raises(ValueError, match="does not exist"):
        vis.bra_block(nano, 1, 5)
    with pytest.raises(ValueError, match="skimage:astronaut"):
        vis.load_image("skimage:nope")
    assert vis.load_image("skimage:chelsea").mode == "RGB"
    with pytest.raises(ValueError, match="0..1796"):
        vis.load_image("digits:1797")
    digit = vis.load_image("digits:0")  # the first digit of scikit-learn's set is a 0: a ring, dark in the middle
    pixels = np.asarray(digit)[..., 0].astype(int)
    assert digit.size == (8, 8) and pixels[:, 1:7].max() == 240 and pixels[3:5, 3:5].max() < 100


def test_the_figure_closes_with_a_colour_scale_and_marks_queries_visibly_on_large_images(nano):
    from matplotlib import colormaps

    size = 512  # drawn at 1:1: the markers must not shrink to a few pixels
    pixels = np.full((size, size, 3), 128, np.uint8)
    _, inputs = vis.preprocess(Image.fromarray(pixels), (size, size), (0.5,) * 3, (0.25,) * 3)
    record = vis.capture_routing(nano, inputs, vis.bra_block(nano, 1, 0))
    query = (200, 300)
    figure = np.asarray(vis.render_figure(pixels, record, 8, query, vis.grid_queries((size, size), 2), "test", 256))
    panel = (size, size)
    assert figure.shape[:2][::-1] == vis.figure_size(panel, 4)
    strip_top = figure.shape[0] - vis.MARGIN - vis.SCALE_BAR_HEIGHT
    strip = figure[strip_top + vis.SCALE_BAR_HEIGHT // 2, vis.MARGIN:-vis.MARGIN].astype(int)
    for position, heat in ((0, vis.HEAT_LOW), (-1, 1.0)):  # the ends of the scale are the heatmaps' ends
        expected = np.array(colormaps["inferno"](heat)[:3]) * 255
        assert np.abs(strip[position] - expected).max() <= 2, (strip[position], expected)
    radius = vis.marker_radius(panel, 1)
    assert radius >= size // 40
    x0, y0 = vis.panel_origin(0, 0, panel)
    ring = figure[y0 + query[1], x0 + query[0] + radius - 1: x0 + query[0] + radius + 3]  # right of the query
    assert any(tuple(pixel) == vis.QUERY_COLOR for pixel in ring)
