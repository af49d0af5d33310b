"""The flex backend (routing as a BlockMask for torch's compiled flex_attention) against the float64
dense masked oracle and the reference backend.

On CPU flex_attention has a compiled forward only: the outputs are checked, and the backend must step
aside where autograd records. On CUDA (marked `gpu`) outputs and q/k/v gradients are checked too.
Every new shape or dtype compiles flex's kernel anew (about 10 s on a 2-core CPU), so the CPU cases
are few and small, and chosen so that the padding modes share compiled configurations.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_ops_oracle import _dense_oracle
from torch._dynamo.utils import counters

from biformer.ops import bi_level_routing_attention
from biformer.ops.backends import BACKENDS, PRIORITY, flex, not_supported_reasons, select_backend
from biformer.ops.backends.inputs import RoutedAttentionInputs
from biformer.ops.functional import region_grid
from biformer.ops.regions import PADDING_MODES, RegionGrid

# (batch, height, width, heads, head_dim, n_win, topk)
PACKED = (2, 8, 8, 2, 4, 4, 1)  # 2x2-token regions, 4 to a 16-token block; topk=1; divisible
ODD = (1, 13, 17, 2, 8, (3, 4), 5)  # odd non-square map, 3x4 grid of 5x5-token regions in 32-token slots
SINGLE = (1, 4, 6, 1, 8, (4, 6), 24)  # 1x1-token regions, 16 to a block (24 in 2 blocks); topk=all
# 3x3-token regions (a row and a column of them only padding), topk=all; in "legacy_nchw" mode 5x5
# regions of 2x2 tokens, 25 in 7 blocks of 4: the last block partly empty
EDGE = (1, 9, 9, 1, 8, 4, 16)
CPU_CASES = (PACKED, ODD, SINGLE, EDGE)
# half precision: gap to the float32 reference on the same (rounded) inputs; the reference's own
# result in that dtype is as far (on CPU at ODD: 2.6e-3 bfloat16, 4.3e-4 float16, for both)
HALF_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
NOISE = 1e4

# CUDA: head dims of at least 16 (flex's Triton dots); v's head dim differs in one-image cases
GPU_CASES = (
    (2, 14, 14, 2, 16, 7, 4),  # BiFormer stage 3 geometry: 2x2-token regions packed 4 to a block
    (1, 13, 17, 2, 16, (3, 4), 5),  # odd, non-square, 5x5-token regions in 32-token slots
    (2, 28, 28, 2, 32, 7, 4),  # 4x4-token regions: every routed block full, no mask evaluated
    (1, 4, 6, 1, 16, (4, 6), 24),  # 1x1-token regions, topk=all
)


@pytest.fixture(autouse=True)
def _room_for_every_configuration():
    """These tests compile more flex configurations than dynamo's recompile limit (8 per function)
    allows one process; past it torch would quietly run flex's unfused eager implementation."""
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


def _inputs(case, dtype=torch.float32, device="cpu", requires_grad=False):
    """q, k (views of one packed qkv, as the layer passes them) and v (wider heads in one-image cases)."""
    batch, height, width, heads, head_dim, _, _ = case
    gen = torch.Generator().manual_seed(0)
    qk = torch.randn(batch, height, width, 2, heads, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, height, width, heads, head_dim + 8 * (batch == 1), generator=gen).to(device, dtype)
    qk.requires_grad_(requires_grad)
    v.requires_grad_(requires_grad)
    return qk, v


def _forward(case, backend, padding, qk, v, scale=0.3):
    *_, n_win, topk = case
    q, k = qk.unbind(3)
    return bi_level_routing_attention(q, k, v, n_win, topk, scale=scale, padding=padding, backend=backend,
                                      return_routing=True)


def _padding_modes(cases):
    # ODD in "legacy_nchw" mode (4x5 regions of 4x4 tokens) compiles a configuration of its own; EDGE
    # covers that mode in the fast loop
    slow = {(ODD, "legacy_nchw")}
    return [pytest.param(case, mode, id=f"{case}-{mode}", marks=[pytest.mark.slow] * ((case, mode) in slow))
            for case in cases for mode in PADDING_MODES]


@pytest.mark.parametrize("case, padding", _padding_modes(CPU_CASES))
def test_cpu_forward_matches_oracle_and_reference(case, padding):
    qk, v = _inputs(case)
    with torch.no_grad():
        out, routing = _forward(case, "flex", padding, qk, v)
        reference, _ = _forward(case, "reference", padding, qk, v)
    q, k = qk.double().unbind(3)
    expected = _dense_oracle(q, k, v.double(), routing.indices, case[5], 0.3, padding)
    assert out.dtype == torch.float32 and out.shape == v.shape
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_half_precision(dtype):
    qk, v = _inputs(ODD, dtype)
    with torch.no_grad():
        out, _ = _forward(ODD, "flex", "masked", qk, v)
        want, _ = _forward(ODD, "reference", "masked", qk.float(), v.float())
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), want, atol=HALF_TOLERANCE[dtype], rtol=HALF_TOLERANCE[dtype])


def test_block_mask_packs_small_regions_and_passes_full_blocks():
    """PACKED: 16 regions of 4 tokens, 4 to a 16-token block; with topk=all every block pair is full."""
    grid = region_grid((8, 8), 4)
    indices = torch.arange(16).expand(2, 16, 16)
    mask = flex.routing_block_mask(indices, grid, masked=True, with_q_blocks=False)
    assert mask.BLOCK_SIZE == (16, 16) and mask.seq_lengths == (64, 64)
    assert mask.kv_num_blocks.eq(0).all() and mask.full_kv_num_blocks.eq(4).all()
    # topk=1, each region to itself: each block is partial with itself only (the mask keeps regions apart)
    mask = flex.routing_block_mask(torch.arange(16).view(1, 16, 1), grid, masked=True, with_q_blocks=False)
    assert mask.kv_num_blocks.eq(1).all() and mask.full_kv_num_blocks.eq(0).all()
    assert torch.equal(mask.kv_indices[0, 0, :, 0], torch.arange(4, dtype=torch.int32))
    dense = mask.to_dense()[0, 0]  # (query blocks, key blocks), 1 where the kernel visits
    assert torch.equal(dense, torch.eye(4, dtype=dense.dtype))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", [PACKED, EDGE], ids=str)
def test_mask_mod_alone_is_the_whole_mask(case, monkeypatch):
    """Past dynamo's recompile limit torch runs flex unfused, applying mask_mod to every (query, key)
    pair without the block sparsity: the mask must say everything by itself."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(flex, "_compiled_flex", lambda: flex_attention)
    qk, v = _inputs(case)
    with torch.no_grad():
        for padding in ("masked", "legacy"):
            got, _ = _forward(case, "flex", padding, qk, v)
            want, _ = _forward(case, "reference", padding, qk, v)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_masked_padding_is_never_read(monkeypatch):
    """Masked mode: the same output with large noise where the map is padded (RegionGrid.pad)."""
    qk, v = _inputs(ODD)
    with torch.no_grad():
        clean, _ = _forward(ODD, "flex", "masked", qk, v)
        zero_pad = RegionGrid.pad

        def noisy_pad(grid, x):
            padded = zero_pad(grid, x)
            noise = torch.randn_like(padded) * NOISE
            noise[:, : grid.height, : grid.width] = 0
            return padded + noise

        monkeypatch.setattr(RegionGrid, "pad", noisy_pad)
        noisy, _ = _forward(ODD, "flex", "masked", qk, v)
        legacy_noisy, _ = _forward(ODD, "flex", "legacy", qk, v)
        monkeypatch.undo()
        legacy_clean, _ = _forward(ODD, "flex", "legacy", qk, v)
    torch.testing.assert_close(noisy, clean, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(legacy_noisy, legacy_clean, atol=1e-3)  # the noise was there to read


def test_compiles_once_per_configuration():
    """New values, routing, scale or padding treatment on the same shapes reuse the compiled kernel."""
    qk, v = _inputs(ODD)
    with torch.no_grad():
        _forward(ODD, "flex", "masked", qk, v)  # compiled here or by an earlier test
        graphs = counters["stats"]["unique_graphs"]
        _forward(ODD, "flex", "legacy", torch.randn_like(qk), torch.randn_like(v), scale=0.7)
        _forward(ODD, "flex", "masked", qk, v, scale=None)
    assert counters["stats"]["unique_graphs"] == graphs


def test_no_grad_with_inputs_that_require_grad():
    """flex_attention itself refuses CPU inputs that require grad; where autograd records nothing
    the backend runs on them all the same."""
    qk, v = _inputs(ODD, requires_grad=True)
    with torch.no_grad():
        out, _ = _forward(ODD, "flex", "masked", qk, v)
        want, _ = _forward(ODD, "reference", "masked", qk, v)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_cpu_autograd_and_float64_are_refused_with_reasons():
    qk, v = _inputs(ODD, requires_grad=True)
    with pytest.raises(ValueError, match="backend='flex' cannot run.*no backward on cpu"):
        _forward(ODD, "flex", "masked", qk, v)
    qk, v = _inputs(ODD, torch.float64)
    with pytest.raises(ValueError, match="backend='flex' cannot run.*dtype torch.float64"):
        _forward(ODD, "flex", "masked", qk, v)


@pytest.mark.parametrize("grad", [False, True])
def test_never_auto_selected_on_cpu(grad):
    for batch, size, heads, n_win, topk in ((8, 56, 2, 7, 1), (8, 28, 4, 7, 4), (8, 14, 8, 7, 16)):  # BiFormer-T
        q = torch.zeros(batch, size, size, heads, 32, requires_grad=grad)
        assert select_backend(None, RoutedAttentionInputs.of(q, q, q, region_grid((size, size), n_win), topk, True)).name != "flex"


def test_unavailable_without_a_cpu_kernel_or_cuda(monkeypatch):
    monkeypatch.setattr(flex, "CPU_KERNEL_MISSING", "no C++ compiler for torch.compile's CPU kernels (set CXX)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    qk, v = _inputs(ODD)
    with pytest.raises(ValueError, match="backend='flex' cannot run.*no CUDA device, and no C\\+\\+ compiler"):
        _forward(ODD, "flex", "masked", qk, v)


def test_registered_after_the_triton_backends():
    assert PRIORITY[:3] == ("triton", "triton_region", "flex")


def test_steps_aside_inside_torch_compile_on_cpu(monkeypatch):
    """Inductor's CPU flex_attention lowering fails on masks built in the graph (torch 2.14): inside a
    compiled model on CPU dispatch takes another backend, and forcing flex says why."""
    q = torch.zeros(1, 8, 8, 1, 8)
    grid = region_grid((8, 8), 4)
    inputs = RoutedAttentionInputs.of(q, q, q, grid, 2, True)
    assert not not_supported_reasons(flex.BACKEND, inputs)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert any("inside torch.compile" in reason for reason in not_supported_reasons(flex.BACKEND, inputs))


def _outputs_and_grads(case, backend, padding, qk, v):
    out, _ = _forward(case, backend, padding, qk, v)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    return (out, *torch.autograd.grad(out, (qk, v), grad_out))


@pytest.mark.gpu
@pytest.mark.parametrize("case, padding", [
    pytest.param(case, mode, id=f"{case}-{mode}") for case in GPU_CASES for mode in ("masked", "legacy")
] + [pytest.param(GPU_CASES[1], "legacy_nchw", id=f"{GPU_CASES[1]}-legacy_nchw")])
def test_cuda_float32_outputs_and_gradients(case, padding):
    qk, v = _inputs(case, device="cuda", requires_grad=True)
    got = _outputs_and_grads(case, "flex", padding, qk, v)
    for a, b in zip(got, _outputs_and_grads(case, "reference", padding, qk, v)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_half_precision_outputs_and_gradients(dtype):
    case = GPU_CASES[0]  # packed regions: the mask_mod path
    qk, v = _inputs(case, dtype, device="cuda", requires_grad=True)
    got = _outputs_and_grads(case, "flex", "masked", qk, v)
    qk32, v32 = (t.detach().float().requires_grad_() for t in (qk, v))
    for a, b in zip(got, _outputs_and_grads(case, "reference", "masked", qk32, v32)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, atol=HALF_TOLERANCE[dtype], rtol=HALF_TOLERANCE[dtype])


@pytest.mark.parametrize("grad", [False, True])
def test_never_auto_selected_where_it_claims_to_be_fast(monkeypatch, grad):
    """Opt-in until a GPU run passes: dispatch skips flex even where it is runnable and fast (as on CUDA),
    on a device the test fakes by making flex claim it and every backend before it step aside."""
    claims = replace(flex.BACKEND, forward_only_on=(), unavailable=None, check=None, is_fast_for=lambda inputs: True)
    monkeypatch.setitem(BACKENDS, "flex", claims)
    monkeypatch.setitem(BACKENDS, "triton", replace(BACKENDS["triton"], unavailable=lambda: "stepped aside"))
    q = torch.zeros(2, 28, 28, 2, 32, requires_grad=grad)
    assert select_backend(None, RoutedAttentionInputs.of(q, q, q, region_grid((28, 28), 7), 4, True)).name != "flex"
    assert select_backend("flex", RoutedAttentionInputs.of(q, q, q, region_grid((28, 28), 7), 4, True)) is claims


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_inside_a_compiled_function():
    """fullgraph torch.compile traces the backend with the op (block mask, layout, flex_attention):
    outputs and gradients as in eager mode."""
    case = GPU_CASES[0]
    *_, n_win, topk = case

    def op(qk, v):
        q, k = qk.unbind(3)
        return bi_level_routing_attention(q, k, v, n_win, topk, backend="flex")

    qk, v = _inputs(case, device="cuda", requires_grad=True)
    grad_out = torch.randn(v.shape, device="cuda")
    got = torch.compile(op, fullgraph=True)(qk, v)
    want = op(qk, v)
    for a, b in zip((got, *torch.autograd.grad(got, (qk, v), grad_out)),
                    (want, *torch.autograd.grad(want, (qk, v), grad_out))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
