"""Segmentation metrics against a pixel-by-pixel count, and whole/sliding/flipped inference on models whose
answers are known."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from biformer.dense.inference import segment
from biformer.dense.metrics import ConfusionMatrix, iou_table


def test_confusion_matrix_counts_pixels_as_a_loop_does():
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 4, (3, 9, 7), generator=generator)
    targets[0, :2] = 255
    predictions = torch.randint(0, 4, (3, 9, 7), generator=generator)
    predictions[targets == 3] = 1  # class 3: present, never predicted -> IoU 0
    confusion = ConfusionMatrix(5)  # class 4: neither present nor predicted -> no IoU
    confusion.update(predictions[:2], targets[:2])
    confusion.update(predictions[2], targets[2])
    expected = np.zeros((5, 5), dtype=np.int64)
    for t, p in zip(targets.flatten().tolist(), predictions.flatten().tolist()):
        if t != 255:
            expected[t, p] += 1
    assert confusion.matrix.tolist() == expected.tolist()
    iou = confusion.iou()
    for c in range(4):
        union = expected[c].sum() + expected[:, c].sum() - expected[c, c]
        assert iou[c].item() == pytest.approx(expected[c, c] / union)
    assert iou[3] == 0 and math.isnan(iou[4])
    assert confusion.miou() == pytest.approx(100 * iou[:4].mean().item())
    assert confusion.aacc() == pytest.approx(100 * np.trace(expected) / expected.sum())
    table = iou_table(["a", "b", "c", "d", "e"], iou.tolist())
    assert table.splitlines()[4].split() == ["d", "0.00"] and table.splitlines()[5].split() == ["e", "-"]


class Pointwise(nn.Module):
    """A 1x1 convolution: each pixel's logits depend on that pixel alone, so window and padding cannot matter."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 1)
        self.calls: list[tuple[int, int]] = []

    def forward(self, images):
        assert images.shape[-2] % 32 == 0 and images.shape[-1] % 32 == 0
        self.calls.append(tuple(images.shape[-2:]))
        return {"out": self.conv(images)}


def test_whole_and_sliding_inference_agree_on_a_pointwise_model():
    model, images = Pointwise(), torch.randn(2, 3, 70, 100)
    expected = model.conv(images)
    whole = segment(model, images)
    assert whole.shape == (2, 3, 70, 100) and model.calls == [(96, 128)]
    torch.testing.assert_close(whole, expected)
    model.calls.clear()
    slid = segment(model, images, mode="slide", window=64, stride=20)
    assert model.calls == [(64, 64)] * (2 * 3)  # rows start at 0 and 6 (flush with the end), columns at 0, 20, 36
    torch.testing.assert_close(slid, expected, atol=1e-5, rtol=1e-5)


def test_flip_averages_the_probabilities_of_the_mirrored_image():
    model, images = Pointwise(), torch.randn(1, 3, 32, 64)
    flipped = segment(model, images, flip=True)
    torch.testing.assert_close(flipped, model.conv(images).log_softmax(1), atol=1e-5, rtol=1e-5)

    class LeftHalf(nn.Module):  # logit 4 for class 1 on the left half of whatever it sees, 0 elsewhere
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 2, *x.shape[-2:])
            logits[:, 1, :, : x.shape[-1] // 2] = 4.0
            return {"out": logits}

    # every pixel is on the left half of one view (p = sigmoid(4)) and on the right of the other (p = 1/2)
    class_1 = segment(LeftHalf(), torch.zeros(1, 3, 32, 64), flip=True).exp()[:, 1]
    torch.testing.assert_close(class_1, torch.full((1, 32, 64), (torch.sigmoid(torch.tensor(4.0)).item() + 0.5) / 2))


def test_bad_modes_are_named():
    with pytest.raises(ValueError, match="mode must be one of whole, slide"):
        segment(Pointwise(), torch.zeros(1, 3, 32, 32), mode="tiles")
