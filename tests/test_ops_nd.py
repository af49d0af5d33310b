"""BRA on 1, 2 and 3 spatial axes against a dense masked oracle written here (float64, routing recomputed):
per-token region ids by integer division per axis, region means by index_add, dense softmax attention under the
routed mask. Then: a one-frame clip equals the 2-D op, and every backend that claims N-D maps equals the
reference."""
import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from biformer.ops import bi_level_routing_attention
from biformer.ops.backends import BACKENDS, available_backends
from biformer.ops.regions import PADDING_MODES

# (spatial shape, n_win): sizes not divisible by the regions, regions of padding only, one region on an axis
MAPS = [
    ((37,), 5),  # 1-D: regions of 8, the last of 5
    ((9,), 4),  # ceil(9/4) = 3: the last region is all padding in the ceil modes
    ((5, 9, 11), (2, 3, 3)),  # 3-D
    ((3, 7, 6), (1, 2, 2)),  # one region along time
    ((4, 5, 5), 2),  # an int for every axis
    ((7, 4, 9), (3, 2, 4)),  # ceil(7/3) = 3: the last time region is one frame
]


def _geometry(shape, n_win, padding):
    """(regions per axis, tokens per region per axis)."""
    counts = (n_win,) * len(shape) if isinstance(n_win, int) else tuple(n_win)
    if padding == "legacy_nchw":
        sizes = tuple(size // count for size, count in zip(shape, counts))
        return tuple(-(-size // region) for size, region in zip(shape, sizes)), sizes
    return counts, tuple(-(-size // count) for size, count in zip(shape, counts))


def _token_regions(shape, counts, sizes, padded_to=None):
    """The region id of every token of a map of `padded_to` (default `shape`), row-major."""
    grids = torch.meshgrid(*(torch.arange(extent) for extent in (padded_to or shape)), indexing="ij")
    region = torch.zeros_like(grids[0])
    for coordinate, count, size in zip(grids, counts, sizes):
        region = region * count + coordinate // size
    return region.flatten()


def _oracle(q, k, v, n_win, topk, scale, padding):
    """(output, routed indices (B, R, K)) by the definition."""
    batch, *shape = q.shape[:-2]
    counts, sizes = _geometry(shape, n_win, padding)
    regions = math.prod(counts)
    padded = tuple(count * size for count, size in zip(counts, sizes))
    spatial = len(shape)

    def padded_map(x):  # zeros at the end of each axis
        widths = [0, 0] * 2 + [value for size, full in zip(reversed(shape), reversed(padded)) for value in (0, full - size)]
        return F.pad(x, widths)

    # routing: region means of q and k (over the map's tokens; "legacy": over all slots, padding as zeros)
    if padding == "legacy":
        region, flat_q, flat_k = _token_regions(shape, counts, sizes, padded), padded_map(q), padded_map(k)
        count = torch.full((regions,), float(math.prod(sizes)), dtype=q.dtype)
    else:
        region, flat_q, flat_k = _token_regions(shape, counts, sizes), q, k
        count = torch.zeros(regions, dtype=q.dtype).index_add_(0, region, torch.ones(region.numel(), dtype=q.dtype))

    def means(x):
        flat = x.detach().reshape(batch, -1, x.shape[-2] * x.shape[-1])
        return torch.zeros(batch, regions, flat.shape[-1], dtype=x.dtype).index_add_(1, region, flat) / count.clamp(min=1)[:, None]

    logits = (means(flat_q) * scale) @ means(flat_k).transpose(1, 2)
    if padding != "legacy":
        logits[:, :, count == 0] = float("-inf")
    indices = logits.topk(topk, dim=-1).indices
    # attention: each token to the tokens of its region's routed regions ("masked": the map's tokens only;
    # else the padded map's, the padding attended to as zeros)
    if padding != "masked":
        q, k, v = padded_map(q), padded_map(k), padded_map(v)
    token_region = _token_regions(shape, counts, sizes, q.shape[1:1 + spatial])
    routed = torch.zeros(batch, regions, regions, dtype=torch.bool).scatter_(2, indices, True)
    allowed = routed[:, token_region][:, :, token_region]  # (B, N, N)
    qf, kf, vf = (t.flatten(1, spatial).transpose(1, 2) for t in (q, k, v))  # (B, M, N, D)
    attention = ((qf @ kf.transpose(-1, -2)) * scale).masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    out = (attention @ vf).transpose(1, 2).unflatten(1, q.shape[1:1 + spatial])
    for axis, size in enumerate(shape):
        out = out.narrow(1 + axis, 0, size)
    return out, indices


def _inputs(shape, heads=2, head_dim=4, v_dim=6, batch=2, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, *shape, heads, head_dim, generator=generator, dtype=dtype).requires_grad_()
            for _ in range(2))
    v = torch.randn(batch, *shape, heads, v_dim, generator=generator, dtype=dtype).requires_grad_()
    return q, k, v


def _cases():
    for (shape, n_win), padding in itertools.product(MAPS, PADDING_MODES):
        counts, _ = _geometry(shape, n_win, padding)
        for topk in range(1, math.prod(counts) + 1):  # from 1 to all regions
            yield pytest.param(shape, n_win, padding, topk, id=f"{'x'.join(map(str, shape))}-{n_win}-{padding}-top{topk}")


@pytest.mark.parametrize("shape, n_win, padding, topk", list(_cases()))
def test_equals_the_dense_masked_oracle_with_gradients(shape, n_win, padding, topk):
    q, k, v = _inputs(shape)
    scale = 0.3
    out, routing = bi_level_routing_attention(q, k, v, n_win, topk, scale=scale, padding=padding,
                                              return_routing=True)
    expected, indices = _oracle(q, k, v, n_win, topk, scale, padding)
    assert torch.equal(routing.indices.sort(-1).values, indices.sort(-1).values)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(expected, (q, k, v), grad_out)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"grad {name}")


@pytest.mark.parametrize("padding", PADDING_MODES)
def test_a_clip_of_one_frame_is_the_image_op(padding):
    q, k, v = _inputs((13, 17))
    image = bi_level_routing_attention(q, k, v, (3, 4), 5, padding=padding)
    clip = bi_level_routing_attention(q[:, None], k[:, None], v[:, None], (1, 3, 4), 5, padding=padding)
    torch.testing.assert_close(clip[:, 0], image, atol=1e-12, rtol=1e-12)


# the CPU's: the Triton kernels run on the CPU only interpreted (test_triton_region_equals_the_oracle)
N_D_BACKENDS = [name for name in available_backends()
                if 3 in BACKENDS[name].spatial_axes and name not in ("reference", "triton_region")]


@pytest.mark.parametrize("backend", N_D_BACKENDS)
@pytest.mark.parametrize("padding", PADDING_MODES)
@pytest.mark.parametrize("shape, n_win, topk", [((37,), 5, 2), ((5, 9, 11), (2, 3, 3), 4), ((4, 5, 5), 2, 8)])
def test_every_n_d_backend_equals_the_reference(backend, padding, shape, n_win, topk):
    q, k, v = _inputs(shape, dtype=torch.float32, seed=1)
    reference = bi_level_routing_attention(q, k, v, n_win, topk, padding=padding, backend="reference")
    out = bi_level_routing_attention(q, k, v, n_win, topk, padding=padding, backend=backend)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad_out),
                    torch.autograd.grad(reference, (q, k, v), grad_out)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "indexed", "portable"])
@pytest.mark.parametrize("padding", PADDING_MODES)
@pytest.mark.parametrize("shape, n_win, topk", [((9,), 4, 2), ((7, 4, 9), (3, 2, 4), 5)])
def test_each_n_d_backend_equals_the_oracle(backend, padding, shape, n_win, topk):
    q, k, v = _inputs(shape, seed=3)
    out = bi_level_routing_attention(q, k, v, n_win, topk, scale=0.3, padding=padding, backend=backend)
    expected, _ = _oracle(q, k, v, n_win, topk, 0.3, padding)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    grad_out = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(expected, (q, k, v), grad_out)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRETING, reason="runs in a child process: test_ops_backends.py::"
                                              "test_triton_kernels_in_interpreter")
@pytest.mark.parametrize("padding", PADDING_MODES)
@pytest.mark.parametrize("shape, n_win, topk", [((9,), 4, 2), ((37,), 5, 3), ((7, 4, 9), (3, 2, 4), 5),
                                                 ((4, 5, 5), 2, 8), ((2, 24, 24), (1, 3, 3), 4)])
def test_triton_region_equals_the_oracle(padding, shape, n_win, topk):
    """The triton_region kernels (routing included) on 1-D and 3-D maps in float32 against the oracle in float64;
    the last map's 8x8-token regions take the kernels' tensor-core path."""
    q, k, v = _inputs(shape, head_dim=16, v_dim=24, seed=3)
    expected, indices = _oracle(q, k, v, n_win, topk, 0.3, padding)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out, routing = bi_level_routing_attention(q32, k32, v32, n_win, topk, scale=0.3, padding=padding,
                                              backend="triton_region", return_routing=True)
    holding_tokens = _token_regions(shape, *_geometry(shape, n_win, padding)).unique()  # the others tie everywhere
    assert torch.equal(routing.indices[:, holding_tokens].sort(-1).values, indices[:, holding_tokens].sort(-1).values)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    grad_out = torch.randn_like(expected)
    got = torch.autograd.grad(out, (q32, k32, v32), grad_out.float())
    for name, a, b in zip("qkv", got, torch.autograd.grad(expected, (q, k, v), grad_out)):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=2e-5, msg=f"grad {name}")


@pytest.mark.parametrize("n_win, message", [
    ((2, 3), "n_win has 2 values, and the map has 3 spatial axes: give an int"),
    ((2, 3, 9), "asks for more regions along an axis than the 5x9x8 map has tokens"),
    ("2", "n_win must be an int or one int per spatial axis (3 here)"),
])
def test_n_win_that_does_not_fit_the_map_is_refused(n_win, message):
    q, k, v = _inputs((5, 9, 8))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bi_level_routing_attention(q, k, v, n_win, 1)


def test_a_rank_without_a_layout_is_refused():
    q = torch.randn(1, 2, 3, 4, 5, 2, 4)  # four spatial axes
    with pytest.raises(ValueError, match=r"or 1 or 3 spatial axes in place of \(height, width\)"):
        bi_level_routing_attention(q, q, q, 2, 1)


@pytest.mark.parametrize("keep_probs", [False, True])
def test_the_indexed_backend_in_blocks_of_query_rows(monkeypatch, keep_probs):
    """Large regions are computed in blocks of query rows against keys gathered once (what keeps a clip's memory
    linear): forced here with a tiny budget, the result equals the reference."""
    from biformer.ops.backends import indexed

    # scores of 5 query rows (2 heads, float32) against a region's 54 keys (3 routed regions of 2x3x3 tokens)
    monkeypatch.setattr(indexed, "CHUNK_BYTES", 3 * 2 * 54 * 4 * 5)
    head_dim = 64 if keep_probs else 4  # keys <= 2 x head_dim: the forward keeps the probabilities
    q, k, v = _inputs((4, 5, 5), head_dim=head_dim, dtype=torch.float32, seed=2)
    padded = torch.zeros(2, 4, 6, 6, 2, head_dim)  # (4, 5, 5) padded to 2x2x2 regions of 2x3x3
    assert indexed._Plan(padded, padded, torch.zeros(2, 8, 3, dtype=torch.long), [2, 3, 3], torch.float32).block == 5
    out = bi_level_routing_attention(q, k, v, 2, 3, backend="indexed")
    reference = bi_level_routing_attention(q, k, v, 2, 3, backend="reference")
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(reference, (q, k, v), grad_out)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
