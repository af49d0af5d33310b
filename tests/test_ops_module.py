"""BiLevelRoutingAttention module: layouts, any map size, padding modes."""
import pytest
import torch

from biformer.ops import BiLevelRoutingAttention


@pytest.mark.parametrize("padding", ["masked", "legacy"])
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (8, 8), (30, 33)])
def test_any_map_size_runs_with_finite_grads(size, padding):
    layer = BiLevelRoutingAttention(32, 2, n_win=7, topk=4, padding=padding, channels_last=False)
    x = torch.randn(2, 32, *size, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_nchw_and_channels_last_agree():
    torch.manual_seed(0)
    nhwc = BiLevelRoutingAttention(32, 2, n_win=4, topk=3)
    nchw = BiLevelRoutingAttention(32, 2, n_win=4, topk=3, channels_last=False)
    nchw.load_state_dict(nhwc.state_dict())
    x = torch.randn(2, 13, 10, 32)
    torch.testing.assert_close(nchw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), nhwc(x))


def test_padding_modes_agree_only_on_divisible_maps():
    """Divisible map: both modes are the same computation. Otherwise legacy attends to padding."""
    torch.manual_seed(0)
    masked = BiLevelRoutingAttention(32, 2, n_win=4, topk=3)
    legacy = BiLevelRoutingAttention(32, 2, n_win=4, topk=3, padding="legacy")
    legacy.load_state_dict(masked.state_dict())
    x = torch.randn(1, 12, 16, 32)
    torch.testing.assert_close(masked(x), legacy(x), atol=0, rtol=0)
    y = torch.randn(1, 13, 17, 32)
    assert not torch.allclose(masked(y), legacy(y), atol=1e-4)


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
    from biformer.ops.inplace import add_into

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
    from biformer.ops.inplace import InplaceGELU

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
