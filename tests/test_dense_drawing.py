"""The pictures of dense predictions: the segmentation overlay and its legend, and drawn detections."""
import numpy as np
import torch
from PIL import Image

from biformer.dense.drawing import LEGEND_ROW, MIN_SIDE, draw_detections, overlay, palette


def test_overlay_tints_each_class_and_lists_the_present_ones():
    image = Image.new("RGB", (400, 390), (100, 100, 100))
    labels = np.zeros((390, 400), dtype=np.int64)
    labels[:, 200:] = 2
    picture = overlay(image, labels, ["background", "one", "two"])
    assert picture.size == (400, 390 + 2 * LEGEND_ROW + 4)  # two legend lines: classes 0 and 2
    colours = palette(3)
    assert picture.getpixel((5, 5)) == tuple(int(round(0.5 * 100 + 0.5 * c)) for c in colours[0])
    assert picture.getpixel((300, 5)) == tuple(int(round(0.5 * 100 + 0.5 * c)) for c in colours[2])
    assert len({tuple(c) for c in palette(150)}) == 150


def test_a_small_input_is_drawn_larger_with_a_legible_legend():
    """128 px, as the digit scenes are: enlarged 3x to 384 px; legend text 16 px high, swatches 16 px."""
    image = Image.new("RGB", (128, 128), (100, 100, 100))
    labels = np.zeros((128, 128), dtype=np.int64)
    labels[:, 64:] = 1
    picture = overlay(image, labels, ["background", "a-long-class-name-for-the-legend"])
    assert MIN_SIDE == 384 and picture.height == 384 + 2 * LEGEND_ROW + 4
    assert picture.getpixel((191, 10)) != picture.getpixel((192, 10))  # the class border, at 3 x 64
    legend = np.asarray(picture)[384:]
    text_rows = np.flatnonzero((legend[:, 30:] < 80).all(axis=-1).any(axis=1))  # dark text right of the swatches
    assert text_rows.size and text_rows.max() - text_rows.min() >= 2 * 10  # two lines of text of 10+ px each


def test_draw_detections_keeps_what_scores_enough():
    image = Image.new("RGB", (32, 48), "black")
    detection = {"boxes": torch.tensor([[2.0, 2.0, 12.0, 20.0], [16.0, 30.0, 30.0, 46.0]]),
                 "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.1]),
                 "masks": torch.zeros(2, 1, 48, 32)}
    detection["masks"][0, 0, 4:18, 4:10] = 1
    picture = np.asarray(draw_detections(image, detection, ["a", "b"], score_threshold=0.5))
    factor = -(-MIN_SIDE // 32)
    assert picture.shape == (48 * factor, 32 * factor, 3)
    colour = palette(3)[1]
    edge = picture[20 * factor - 1, 5 * factor]  # on the kept box's bottom edge
    assert np.array_equal(edge, colour)
    inside = picture[10 * factor, 6 * factor]  # inside its mask: tinted, not black
    assert inside.sum() > 0
    assert picture[40 * factor, 23 * factor].sum() == 0  # the low-scoring box is not drawn
