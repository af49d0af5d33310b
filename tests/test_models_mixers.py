"""The ablation mixers against a dense masked-attention oracle built from each pattern's definition, in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from biformer.models.mixers import FullAttention, GridAttention, StripeAttention, WindowAttention


def _window_ids(size: int, window: int, shifted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position along one axis: which window it lies in and Swin's segment, in the rolled padded map."""
    tile = min(window, size)
    shift = tile // 2 if shifted and size > window else 0
    padded = math.ceil(size / tile) * tile
    rolled = (torch.arange(size) - shift) % padded
    segment = torch.zeros(size, dtype=torch.long)
    if shift:
        segment = torch.where(rolled >= padded - tile, 1, 0) + torch.where(rolled >= padded - shift, 1, 0)
    return rolled // tile, segment


def _same(ids_y: torch.Tensor, ids_x: torch.Tensor) -> torch.Tensor:
    """(HW, HW): tokens (y, x) and (y', x') share ids along both axes."""
    y = ids_y[:, None].expand(-1, len(ids_x)).flatten()
    x = ids_x[None, :].expand(len(ids_y), -1).flatten()
    return (y[:, None] == y[None, :]) & (x[:, None] == x[None, :])


def window_mask(height, width, heads, window, shifted):
    window_y, segment_y = _window_ids(height, window, shifted)
    window_x, segment_x = _window_ids(width, window, shifted)
    allowed = _same(window_y, window_x) & _same(segment_y, segment_x)
    return allowed.expand(heads, -1, -1)


def stripe_mask(height, width, heads, stripe):
    rows = _same(torch.arange(height) // min(stripe, height), torch.zeros(width, dtype=torch.long))
    columns = _same(torch.zeros(height, dtype=torch.long), torch.arange(width) // min(stripe, width))
    horizontal = (heads + 1) // 2
    return torch.stack([rows] * horizontal + [columns] * (heads - horizontal))


def grid_mask(height, width, heads, grid):
    cell_h, cell_w = math.ceil(height / min(grid, height)), math.ceil(width / min(grid, width))
    return _same(torch.arange(height) % cell_h, torch.arange(width) % cell_w).expand(heads, -1, -1)


def full_mask(height, width, heads):
    return torch.ones(heads, height * width, height * width, dtype=torch.bool)


def oracle(q, k, v, mask):
    """Dense softmax attention over the allowed pairs; q, k, v (B, H, W, M, D), mask (M, HW, HW)."""
    batch, height, width, heads, dim = q.shape
    q, k, v = (t.flatten(1, 2).transpose(1, 2) for t in (q, k, v))  # (B, M, HW, D)
    logits = (q @ k.transpose(-1, -2)) * dim**-0.5
    out = logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    return out.transpose(1, 2).reshape(batch, height, width, heads, dim)


# (mixer, its arguments, the oracle's mask(height, width, heads)); maps odd and non-square, sides
# that do not divide (padding), windows and grids larger than a side, 1, 2 and 3 heads
CASES = [
    ("window", WindowAttention, dict(window_size=4), lambda h, w, m: window_mask(h, w, m, 4, False)),
    ("window-shifted", WindowAttention, dict(window_size=4, shifted=True), lambda h, w, m: window_mask(h, w, m, 4, True)),
    ("window-shifted-3", WindowAttention, dict(window_size=3, shifted=True), lambda h, w, m: window_mask(h, w, m, 3, True)),
    ("window-large", WindowAttention, dict(window_size=8, shifted=True), lambda h, w, m: window_mask(h, w, m, 8, True)),
    ("stripe-1", StripeAttention, dict(stripe_width=1), lambda h, w, m: stripe_mask(h, w, m, 1)),
    ("stripe-2", StripeAttention, dict(stripe_width=2), lambda h, w, m: stripe_mask(h, w, m, 2)),
    ("stripe-4", StripeAttention, dict(stripe_width=4), lambda h, w, m: stripe_mask(h, w, m, 4)),
    ("grid-3", GridAttention, dict(grid_size=3), lambda h, w, m: grid_mask(h, w, m, 3)),
    ("grid-4", GridAttention, dict(grid_size=4), lambda h, w, m: grid_mask(h, w, m, 4)),
    ("grid-large", GridAttention, dict(grid_size=8), lambda h, w, m: grid_mask(h, w, m, 8)),
    ("full", FullAttention, {}, full_mask),
]
SHAPES = [(2, 9, 11, 3), (1, 7, 5, 2), (1, 6, 13, 1), (2, 8, 8, 2)]  # (batch, height, width, heads)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name, mixer, kwargs, mask_of", CASES, ids=[case[0] for case in CASES])
def test_mixer_matches_dense_oracle(name, mixer, kwargs, mask_of, shape):
    batch, height, width, heads = shape
    head_dim = 4
    layer = mixer(heads * head_dim, heads, **kwargs)
    generator = torch.Generator().manual_seed(height * 100 + width)
    q, k, v = (torch.randn(batch, height, width, heads, head_dim, generator=generator) for _ in range(3))
    grad = torch.randn(batch, height, width, heads, head_dim, generator=generator)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    expected_inputs = [t.double().requires_grad_() for t in (q, k, v)]

    out = layer.attend(*inputs)
    expected = oracle(*expected_inputs, mask_of(height, width, heads))
    (out * grad).sum().backward()
    (expected * grad.double()).sum().backward()

    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=0)
    for name, got, want in zip("qkv", inputs, expected_inputs):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-4, rtol=0, msg=f"d{name}")


def test_oracle_masks_are_sparse_where_they_should_be():
    """The oracle's patterns restrict attention (a window mask that allowed every pair would prove nothing)."""
    keys = lambda mask: mask[0].sum(-1)  # keys per query, head 0
    assert keys(window_mask(8, 8, 1, 4, False)).tolist() == [16] * 64
    assert keys(stripe_mask(8, 8, 1, 2)).tolist() == [16] * 64
    assert keys(grid_mask(8, 8, 1, 4)).tolist() == [16] * 64
    shifted = keys(window_mask(8, 8, 1, 4, True))
    assert shifted.min() == 4 and shifted.max() == 16  # the wrapped corner's pieces are cut apart


def test_module_adds_lepe_and_projects():
    """forward = proj(attend(q, k, v) + lepe(v)) with q, k, v from the layer's own qkv."""
    torch.manual_seed(0)
    layer = WindowAttention(16, 2, window_size=3, shifted=True)
    x = torch.randn(2, 7, 5, 16)
    q, k, v = layer.qkv(x).unflatten(-1, (3, 2, 8)).unbind(3)
    attention = oracle(q.double(), k.double(), v.double(), window_mask(7, 5, 2, 3, True)).float().flatten(3)
    lepe = F.conv2d(v.flatten(3).permute(0, 3, 1, 2), layer.lepe.weight, layer.lepe.bias, padding=2, groups=16)
    expected = layer.proj(attention + lepe.permute(0, 2, 3, 1))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixer, kwargs", [(WindowAttention, {"window_size": 0}), (StripeAttention, {"stripe_width": 1.5}),
                                           (GridAttention, {"grid_size": True}), (FullAttention, {"num_heads": 3})])
def test_bad_arguments_are_named(mixer, kwargs):
    arguments = {"dim": 16, "num_heads": 2, **kwargs}
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        mixer(**arguments)


def test_wrong_input_shape_is_explained():
    with pytest.raises(ValueError, match=r"\(B, H, W, C\) input with C=16"):
        GridAttention(16, 2)(torch.randn(1, 16, 4, 4))
