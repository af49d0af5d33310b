"""Bad input to the BRA op and module raises a ValueError that names the problem."""
import importlib.util

import pytest
import torch

from biformer.ops import BiLevelRoutingAttention, available_backends, bi_level_routing_attention


def _qkv(shape=(1, 8, 8, 2, 4), **kw):
    return tuple(torch.randn(shape, **kw) for _ in range(3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(topk=0), r"topk must be an int in \[1, 16\]"),
        (dict(topk=17), r"topk must be an int in \[1, 16\]"),
        (dict(topk=2.0), r"topk must be an int"),
        (dict(n_win=9), r"n_win=9 asks for more regions .* 8x8 map"),
        (dict(n_win=(2, 9)), r"n_win=\(2, 9\) asks for more regions"),
        (dict(n_win=0), r"n_win must be positive"),
        (dict(n_win=(2, 2, 2)), r"n_win has 3 values, and the map has 2 spatial axes: give an int \(the same on every "
                                r"axis\) or 2 values, one per axis"),
        (dict(padding="zeros"), r"padding must be one of \('masked', 'legacy', 'legacy_nchw'\)"),
        (dict(backend="nope"), r"backend='nope' is unknown"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = dict(n_win=4, topk=4) | kwargs
    with pytest.raises(ValueError, match=message):
        bi_level_routing_attention(*_qkv(), args.pop("n_win"), args.pop("topk"), **args)


@pytest.mark.parametrize(
    "q, k, v, message",
    [
        (torch.randn(8, 8, 8), None, None, r"q must have shape \(batch, height, width, heads, head_dim\) \(rank 5\), "
                                           r"or 1 or 3 spatial axes"),
        (None, torch.randn(1, 8, 8, 2, 5), None, r"k must have the shape of q"),
        (None, None, torch.randn(1, 8, 7, 2, 4), r"v must match q in all but its last axis, \(1, 8, 8, 2\) of "
                                                 r"\(batch, height, width, heads, head_dim\)"),
        (None, None, torch.randn(1, 8, 8, 2, 4, dtype=torch.float64), r"q, k, v must share one dtype"),
        (torch.randint(0, 3, (1, 8, 8, 2, 4)), None, None, r"q must be a floating-point tensor"),
        (None, torch.randn(1, 8, 8, 2, 4, device="meta"), None, r"q, k, v must be on one device"),
        (torch.randn(1, 0, 28, 2, 4), torch.randn(1, 0, 28, 2, 4), torch.randn(1, 0, 28, 2, 4),
         r"q has an empty map: shape \(1, 0, 28, 2, 4\)"),
        (torch.randn(2, 8, 0, 2, 4), torch.randn(2, 8, 0, 2, 4), torch.randn(2, 8, 0, 2, 4),
         r"q has an empty map: shape \(2, 8, 0, 2, 4\)"),
    ],
)
def test_bad_tensors(q, k, v, message):
    dq, dk, dv = _qkv()
    with pytest.raises(ValueError, match=message):
        bi_level_routing_attention(dq if q is None else q, dk if k is None else k, dv if v is None else v, 4, 4)


def test_available_backends_are_those_that_can_run(monkeypatch):
    """All but the Triton backends and flex run anywhere; those only with CUDA or under TRITON_INTERPRET=1, listed first;
    flex on a CPU with its compiled kernel's needs (AVX2, a C++ compiler)."""
    from biformer.ops.backends import flex

    # in dispatch priority order
    everywhere = ["flex"] * (flex.CPU_KERNEL_MISSING is None) + ["dense", "indexed", "reference", "portable", "original"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert available_backends() == everywhere
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton = ["triton", "triton_region"] if importlib.util.find_spec("triton") else []
    assert available_backends() == triton + everywhere


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=64, num_heads=3), r"num_heads=3 must be positive and divide dim=64"),
        (dict(dim=64, num_heads=2, padding="same"), r"padding must be one of"),
        (dict(dim=64, num_heads=2, side_dwconv=4), r"side_dwconv must be 0 \(off\) or an odd kernel size"),
        (dict(dim=64, num_heads=2, topk=0), r"topk must be >= 1"),
    ],
)
def test_module_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BiLevelRoutingAttention(**kwargs)


def test_module_wrong_channels():
    layer = BiLevelRoutingAttention(32, 2, 4, 2, channels_last=False)
    with pytest.raises(ValueError, match=r"expected a \(B, C, H, W\) input with C=32 channels, got shape \(1, 16, 8, 8\)"):
        layer(torch.randn(1, 16, 8, 8))
