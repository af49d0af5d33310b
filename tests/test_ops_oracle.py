"""BRA against independent oracles: per-token region ids + dense masked softmax attention, in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from biformer.ops import bi_level_routing_attention
from biformer.ops.regions import PADDING_MODES

# (batch, height, width, heads, head_dim, n_win, topk); odd, non-square and non-divisible maps,
# topk=1 and topk=all regions included.
CASES = [
    (2, 8, 8, 2, 4, 4, 1),
    (1, 13, 17, 2, 8, (3, 4), 5),
    (2, 7, 9, 1, 16, 3, 9),
    (1, 11, 5, 3, 4, (4, 2), 1),
    (1, 14, 14, 2, 8, 7, 4),
    (2, 10, 6, 2, 8, (4, 3), 12),
    (1, 9, 9, 1, 8, 4, 3),  # ceil(9/4)=3: the last region row and column are mostly padding
    (1, 11, 10, 2, 8, 2, 3),  # "legacy_nchw": 3x2 regions of 5x5 tokens
]


def _pair(n):
    return (n, n) if isinstance(n, int) else n


def _geometry(height, width, n_win, padding):
    """(rows, cols, region_h, region_w): n_win ceil-sized regions per side, or in "legacy_nchw" mode
    regions of floor(size / n_win) tokens, as many as cover the map."""
    rows, cols = _pair(n_win)
    if padding == "legacy_nchw":
        rh, rw = height // rows, width // cols
        return -(-height // rh), -(-width // rw), rh, rw
    return rows, cols, -(-height // rows), -(-width // cols)


def _token_regions(height, width, n_win, padding, padded_to=None):
    """Region id of every token, by integer division (independent of the op's reshapes).

    padded_to: (H', W') to label a padded map whose regions keep the unpadded geometry.
    """
    _, cols, rh, rw = _geometry(height, width, n_win, padding)
    ph, pw = padded_to or (height, width)
    return ((torch.arange(ph)[:, None] // rh) * cols + torch.arange(pw)[None, :] // rw).flatten()  # (H*W,)


def _oracle_routing(q, k, n_win, topk, scale, padding):
    """Top-k from region means over valid tokens, computed with index_add."""
    batch, height, width = q.shape[:3]
    region = _token_regions(height, width, n_win, padding)
    rows, cols, _, _ = _geometry(height, width, n_win, padding)
    num_regions = rows * cols
    count = torch.zeros(num_regions, dtype=q.dtype).index_add_(0, region, torch.ones(region.numel(), dtype=q.dtype))

    def means(x):
        flat = x.detach().reshape(batch, height * width, -1)
        return torch.zeros(batch, num_regions, flat.shape[-1], dtype=x.dtype).index_add_(1, region, flat) / count.clamp(min=1)[:, None]

    logits = (means(q) * scale) @ means(k).transpose(1, 2)
    logits[:, :, count == 0] = float("-inf")
    return logits.topk(topk, dim=-1).indices


def _dense_oracle(q, k, v, indices, n_win, scale, padding):
    """Dense softmax attention over all tokens with an explicit boolean mask from the routing."""
    batch, height, width, heads, _ = q.shape
    rows, cols, rh, rw = _geometry(height, width, n_win, padding)
    if padding != "masked":  # the padded tokens exist as zeros and are attended to
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, cols * rw - width, 0, rows * rh - height)) for t in (q, k, v))
    region = _token_regions(height, width, n_win, padding, padded_to=q.shape[1:3])
    routed = torch.zeros(batch, rows * cols, rows * cols, dtype=torch.bool)
    routed.scatter_(2, indices, True)  # routed[b, query region, key region]
    allowed = routed[:, region][:, :, region]  # (B, N, N)
    qf, kf, vf = (t.flatten(1, 2).transpose(1, 2) for t in (q, k, v))
    logits = (qf @ kf.transpose(-1, -2)) * scale
    attn = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    out = (attn @ vf).transpose(1, 2).unflatten(1, q.shape[1:3])
    return out[:, :height, :width]


def _inputs(case, dtype=torch.float64, v_dim=None, seed=0):
    batch, height, width, heads, head_dim, _, _ = case
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, height, width, heads, head_dim)
    q, k = (torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() for _ in range(2))
    v = torch.randn(shape[:4] + (v_dim or head_dim,), generator=gen, dtype=dtype).requires_grad_()
    return q, k, v


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("padding", PADDING_MODES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_dense_masked_attention(case, padding):
    *_, n_win, topk = case
    q, k, v = _inputs(case, v_dim=case[4] + 4)
    scale = 0.3
    out, routing = bi_level_routing_attention(q, k, v, n_win, topk, scale=scale, padding=padding, return_routing=True)
    if padding != "legacy":  # region means over the map's tokens only
        want = _oracle_routing(q, k, n_win, topk, scale, padding)
        assert torch.equal(routing.indices.sort(-1).values, want.sort(-1).values)
    expected = _dense_oracle(q, k, v, routing.indices, n_win, scale, padding)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    grad_out = torch.randn_like(out)
    for got, want in zip(_grads(out, (q, k, v), grad_out), _grads(expected, (q, k, v), grad_out)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("padding", PADDING_MODES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_routing_of_slices_of_one_qkv_tensor(case, padding):
    """q and k as the BRA layer makes them, slices of one qkv tensor (routing reads them through one view of
    it): the oracle's routing, and the same logits as from separate copies of q and k."""
    batch, height, width, heads, head_dim, n_win, topk = case
    qkv = torch.randn(batch, height, width, 3, heads, head_dim, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64)
    q, k, v = qkv.unbind(3)
    _, routing = bi_level_routing_attention(q, k, v, n_win, topk, scale=0.3, padding=padding, return_routing=True)
    _, copied = bi_level_routing_attention(q.clone(), k.clone(), v, n_win, topk, scale=0.3, padding=padding,
                                           return_routing=True)
    torch.testing.assert_close(routing.logits, copied.logits, atol=1e-12, rtol=1e-12)
    if padding != "legacy":  # region means over the map's tokens only
        want = _oracle_routing(q, k, n_win, topk, 0.3, padding)
        assert torch.equal(routing.indices.sort(-1).values, want.sort(-1).values)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_float32_close_to_float64_oracle(case):
    *_, n_win, topk = case
    q, k, v = _inputs(case)
    out, routing = bi_level_routing_attention(
        q.float(), k.float(), v.float(), n_win, topk, return_routing=True
    )
    expected = _dense_oracle(q, k, v, routing.indices, n_win, case[4] ** -0.5, "masked")
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_topk_all_regions_is_full_attention(case):
    batch, height, width, heads, head_dim, n_win, _ = case
    q, k, v = _inputs(case)
    out = bi_level_routing_attention(q, k, v, n_win, math.prod(_pair(n_win)))
    full = F.scaled_dot_product_attention(*(t.flatten(1, 2).transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(out, full.transpose(1, 2).reshape(out.shape), atol=1e-10, rtol=1e-10)


def test_autocast_bfloat16_cpu():
    case = (2, 14, 15, 2, 16, 7, 4)
    q, k, v = (t.detach() for t in _inputs(case, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, routing = bi_level_routing_attention(q, k, v, 7, 4, return_routing=True)
    assert out.dtype == torch.bfloat16 and out.shape == v.shape
    # same routing (computed in float32 from the same values), attention at bfloat16 precision
    expected = _dense_oracle(q.double(), k.double(), v.double(), routing.indices, 7, 16**-0.5, "masked")
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)


def test_torch_compile_equals_eager():
    case = (1, 13, 17, 2, 8, (3, 4), 5)
    q, k, v = (t.detach().float() for t in _inputs(case))

    def op(q, k, v):
        return bi_level_routing_attention(q, k, v, (3, 4), 5)

    compiled = torch.compile(op, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), op(q, k, v), atol=1e-5, rtol=1e-5)
