"""BiLevelRoutingAttention module: layouts, any map size, padding modes."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from biformer.ops import BiLevelRoutingAttention, use_backend
from biformer.ops.backends import BACKENDS, reference
from biformer.ops.regions import PADDING_MODES


@pytest.mark.parametrize("padding", PADDING_MODES)
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (8, 8), (30, 33)])
def test_any_map_size_runs_with_finite_grads(size, padding):
    layer = BiLevelRoutingAttention(32, 2, n_win=7, topk=4, padding=padding, channels_last=False)
    x = torch.randn(2, 32, *size, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("padding", PADDING_MODES)
def test_nchw_and_channels_last_agree(padding):
    torch.manual_seed(0)
    nhwc = BiLevelRoutingAttention(32, 2, n_win=4, topk=3, padding=padding)
    nchw = BiLevelRoutingAttention(32, 2, n_win=4, topk=3, padding=padding, channels_last=False)
    nchw.load_state_dict(nhwc.state_dict())
    x = torch.randn(2, 13, 10, 32)
    torch.testing.assert_close(nchw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), nhwc(x))


def test_padding_modes_agree_only_on_divisible_maps():
    """Divisible map: every mode is the same computation. Otherwise the legacy modes attend to padding
    (and "legacy_nchw" cuts the map into 4x5 regions of 4x4 tokens, not 4x4 regions of 4x5)."""
    torch.manual_seed(0)
    masked = BiLevelRoutingAttention(32, 2, n_win=4, topk=3)
    legacy = {mode: BiLevelRoutingAttention(32, 2, n_win=4, topk=3, padding=mode) for mode in ("legacy", "legacy_nchw")}
    for layer in legacy.values():
        layer.load_state_dict(masked.state_dict())
    x = torch.randn(1, 12, 16, 32)
    y = torch.randn(1, 13, 17, 32)
    for layer in legacy.values():
        torch.testing.assert_close(masked(x), layer(x), atol=0, rtol=0)
        assert not torch.allclose(masked(y), layer(y), atol=1e-4)
    assert not torch.allclose(legacy["legacy"](y), legacy["legacy_nchw"](y), atol=1e-4)


def test_use_backend_forces_a_backend_and_restores_each_layers_own(monkeypatch):
    calls = []

    def counted_attend(*args):
        calls.append(args)
        return reference.attend(*args)

    monkeypatch.setitem(BACKENDS, "reference", replace(reference.BACKEND, attend=counted_attend))
    layers = [BiLevelRoutingAttention(16, 2, 2, 2, backend="indexed"), BiLevelRoutingAttention(16, 2, 2, 2)]
    model = nn.Sequential(layers[0], nn.Sequential(nn.Identity(), layers[1]))
    with use_backend(model, "reference"):
        assert [layer.backend for layer in layers] == ["reference", "reference"]
        model(torch.randn(1, 6, 6, 16))
    assert len(calls) == 2 and [layer.backend for layer in layers] == ["indexed", None]
    with pytest.raises(RuntimeError, match="inside the block"), use_backend(model, None):
        assert [layer.backend for layer in layers] == [None, None]  # automatic dispatch
        raise RuntimeError("inside the block")
    assert [layer.backend for layer in layers] == ["indexed", None]
    with pytest.raises(ValueError, match=r"backend='fast' is unknown; choose one of \["), use_backend(model, "fast"):
        pass
    assert [layer.backend for layer in layers] == ["indexed", None]


def test_module_under_bfloat16_autocast_close_to_float32():
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(64, 2, n_win=7, topk=4)
    x = torch.randn(2, 30, 33, 64)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    # bfloat16 keeps ~3 significant digits; routing may flip only on near-ties, which random data lacks
    torch.testing.assert_close(out.float(), reference, atol=5e-2, rtol=5e-2)


def test_add_into_is_in_place_only_where_autograd_records_nothing():
    from biformer.layers.inplace import add_into

    a, b = torch.randn(3), torch.randn(3)
    with torch.no_grad():
        total = add_into(a.clone(), b)
        assert torch.equal(total, a + b)
        fresh = a.clone()
        assert add_into(fresh, b) is fresh  # written into the fresh tensor
        low = a.to(torch.bfloat16)
        assert add_into(low, b).dtype == torch.float32  # promoted as `+` would, not rounded into bfloat16
    leaf = a.clone().requires_grad_()
    fresh = leaf * 1
    total = add_into(fresh, b)
    assert total is not fresh
    total.sum().backward()
    assert torch.equal(leaf.grad, torch.ones(3))


def test_inplace_gelu_equals_gelu_and_keeps_autograd():
    from biformer.layers.inplace import InplaceGELU

    x = torch.randn(4, 5)
    want = torch.nn.functional.gelu(x)
    with torch.inference_mode():
        fresh = x.clone()
        got = InplaceGELU()(fresh)
        assert got is fresh and torch.equal(got, want)
    leaf = x.clone().requires_grad_()
    out = InplaceGELU()(leaf)
    assert torch.equal(out, want) and torch.equal(leaf.detach(), x)  # the input is left alone
    out.sum().backward()
    leaf_ref = x.clone().requires_grad_()
    torch.nn.functional.gelu(leaf_ref).sum().backward()
    assert torch.equal(leaf.grad, leaf_ref.grad)


class _SdpaDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the query dtype of every CPU flash-attention forward that runs."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_mask", [False, True])
def test_sdpa_computes_half_training_in_float32_and_matches_float64(dtype, with_mask):
    from biformer.layers.sdpa import scaled_dot_product_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(2, 1, 20, 20, dtype=torch.float64).masked_fill_(torch.rand(2, 1, 20, 20) < 0.3, float("-inf"))
    mask[..., 0] = 0  # every query keeps a key
    grad_out = torch.randn(2, 3, 20, 8, dtype=torch.float64)
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*leaves64, attn_mask=mask if with_mask else None, scale=0.3)
    want.backward(grad_out)

    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    attn_mask = mask.to(dtype) if with_mask else None
    with _SdpaDtypes() as training, torch.autocast("cpu", dtype=dtype):  # autocast must not cast them back down
        out = scaled_dot_product_attention(*leaves, attn_mask=attn_mask, scale=0.3)
    out.backward(grad_out.to(dtype))
    assert training.dtypes == [torch.float32] and out.dtype == dtype
    tolerance = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(out.double(), want, **tolerance)
    for leaf, leaf64 in zip(leaves, leaves64):
        assert leaf.grad.dtype == dtype
        torch.testing.assert_close(leaf.grad.double(), leaf64.grad, **tolerance)

    with _SdpaDtypes() as inference, torch.no_grad():  # the half forward is the faster one: kept
        scaled_dot_product_attention(*leaves, attn_mask=attn_mask, scale=0.3)
    assert inference.dtypes == [dtype]


@pytest.mark.parametrize("kernel", [3, 5, 7, 9])
@pytest.mark.parametrize("shape,layout", [((2, 6, 9, 11), "channels_last_slice"), ((1, 3, 1, 2), "nchw"), ((2, 4, 13, 6), "nchw")])
def test_depthwise_conv_equals_float64_conv_in_output_and_gradients(kernel, shape, layout):
    from biformer.layers.depthwise import DepthwiseConv2d

    torch.manual_seed(0)
    batch, channels, height, width = shape
    conv = DepthwiseConv2d(channels, kernel)
    if layout == "nchw":
        x = torch.randn(shape)
    else:  # as the lepe conv reads v: a channel slice of a (B, H, W, 3C) qkv tensor
        x = torch.randn(batch, height, width, 3 * channels)[..., 2 * channels:].permute(0, 3, 1, 2)
    x.requires_grad_()
    out = conv(x)
    assert ("_DepthwiseConv" in type(out.grad_fn).__name__) == (kernel > 3)  # sliced weight gradient only where needed
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    x64 = x.detach().double().requires_grad_()
    weight64, bias64 = conv.weight.detach().double().requires_grad_(), conv.bias.detach().double().requires_grad_()
    want = torch.nn.functional.conv2d(x64, weight64, bias64, padding=kernel // 2, groups=channels)
    want.backward(grad_out.double())
    for got, expected in ((out, want), (x.grad, x64.grad), (conv.weight.grad, weight64.grad), (conv.bias.grad, bias64.grad)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_depthwise_conv_under_autocast_and_input_errors():
    from biformer.layers.depthwise import DepthwiseConv2d

    torch.manual_seed(0)
    conv = DepthwiseConv2d(8, 5)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    conv(x).square().sum().backward()
    want_weight_grad, want_x_grad = conv.weight.grad.clone(), x.grad.clone()
    conv.zero_grad(), x.grad.zero_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
        assert out.dtype == torch.bfloat16  # as nn.Conv2d under autocast
        out.float().square().sum().backward()  # backward inside the autocast region, as training loops do
    assert conv.weight.grad.dtype == torch.float32
    torch.testing.assert_close(conv.weight.grad, want_weight_grad, rtol=5e-2, atol=5e-1)
    torch.testing.assert_close(x.grad, want_x_grad, rtol=5e-2, atol=5e-2)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        DepthwiseConv2d(8, 4)


def test_depthwise_conv_compiles_with_its_sliced_backward():
    from biformer.layers.depthwise import DepthwiseConv2d

    torch.manual_seed(0)
    conv = DepthwiseConv2d(4, 5)
    x = torch.randn(2, 4, 9, 7, requires_grad=True)
    torch.compile(conv, fullgraph=True)(x).square().sum().backward()
    oracle = [t.detach().double().requires_grad_() for t in (x, conv.weight, conv.bias)]
    torch.nn.functional.conv2d(*oracle, padding=2, groups=4).square().sum().backward()
    for got, want in zip((x.grad, conv.weight.grad, conv.bias.grad), oracle):
        torch.testing.assert_close(got.double(), want.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", list(PADDING_MODES))
@pytest.mark.parametrize("size, region_size, n_win", [((56, 56), 8, (7, 7)), ((30, 33), 8, (4, 5)), ((5, 3), 8, (1, 1))])
def test_region_size_gives_the_grid_it_implies(size, region_size, n_win, padding):
    """With region_size the grid follows from each map: the same output as the n_win it implies."""
    torch.manual_seed(0)
    by_size = BiLevelRoutingAttention(32, 2, topk=1, padding=padding, region_size=region_size)
    by_count = BiLevelRoutingAttention(32, 2, n_win=n_win, topk=1, padding=padding)
    by_count.load_state_dict(by_size.state_dict())
    assert by_size.regions_per_axis(size) == n_win
    x = torch.randn(2, *size, 32)
    torch.testing.assert_close(by_size(x), by_count(x), atol=0, rtol=0)


@pytest.mark.parametrize("region_size", [0, 2.5, True])
def test_region_size_must_be_a_positive_int(region_size):
    with pytest.raises(ValueError, match="region_size must be a positive int"):
        BiLevelRoutingAttention(32, 2, region_size=region_size)
