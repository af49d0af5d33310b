"""Every BRA backend against the reference backend (the original's gather algorithm): output, q/k/v
gradients, padding modes, odd sizes, dtypes, dispatch, torch.compile. The Triton kernels run on CPU
in Triton's interpreter (TRITON_INTERPRET=1), on tiny shapes."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from biformer.ops import bi_level_routing_attention
from biformer.ops.backends import BACKENDS, select_backend
from biformer.ops.functional import region_grid
from biformer.ops.regions import _fill_padding_with_noise

CPU_BACKENDS = [name for name in BACKENDS if name not in ("reference", "triton")]

# (batch, height, width, heads, head_dim, n_win, topk): divisible and padded maps, non-square
# grids, topk=1 and topk=all, regions made only of padding, 2x2-token regions, one region.
CASES = [
    (2, 8, 8, 2, 4, 4, 1),
    (1, 13, 17, 2, 8, (3, 4), 5),
    (2, 7, 9, 1, 16, 3, 9),
    (1, 9, 9, 1, 8, 4, 3),
    (2, 14, 14, 4, 8, 7, 16),
    (1, 16, 16, 1, 8, 1, 1),
]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
# half precision: gap to the float32 reference on the same (rounded) inputs; the reference's own
# bfloat16/float16 result is no closer
HALF_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _qkv(case, dtype=torch.float32, v_extra=0, seed=0, device="cpu"):
    """q, k, v as views of one packed qkv leaf, the layout BiLevelRoutingAttention passes."""
    batch, height, width, heads, head_dim, _, _ = case
    gen = torch.Generator().manual_seed(seed)
    qk = torch.randn(batch, height, width, 2, heads, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, height, width, heads, head_dim + v_extra, generator=gen, dtype=dtype)
    return qk.to(device).requires_grad_(), v.to(device).requires_grad_()


def _run(case, backend, padding, qk, v, grad_seed=1):
    """Output and the gradients of qk and v for a fixed random output gradient."""
    *_, n_win, topk = case
    q, k = qk.unbind(3)
    out = bi_level_routing_attention(q, k, v, n_win, topk, scale=0.3, padding=padding, backend=backend)
    # drawn in float32 and rounded, so that a half-precision run and its float32 reference get the
    # same gradient (randn's half-precision streams differ between torch builds)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
    return (out, *torch.autograd.grad(out, (qk, v), grad_out))


def _assert_matches_reference(case, backend, padding, dtype=torch.float32, v_extra=0, device="cpu"):
    qk, v = _qkv(case, dtype, v_extra, device=device)
    tol = TOLERANCE[dtype]
    for got, want in zip(_run(case, backend, padding, qk, v), _run(case, "reference", padding, qk, v)):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("padding", ["masked", "legacy"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backend_equals_reference(backend, case, padding):
    _assert_matches_reference(case, backend, padding, v_extra=4 if case[0] == 1 else 0)


@pytest.mark.parametrize("case", CASES[1:3], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backend_float64(backend, case):
    _assert_matches_reference(case, backend, "masked", dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backend_half_precision(backend, dtype):
    case = CASES[1]
    qk, v = _qkv(case, dtype)
    got = _run(case, backend, "masked", qk, v)
    qk32, v32 = (t.detach().float().requires_grad_() for t in (qk, v))
    want = _run(case, "reference", "masked", qk32, v32)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, atol=HALF_TOLERANCE[dtype], rtol=HALF_TOLERANCE[dtype])


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backend_half_precision_inference(backend, dtype, case):
    """Without gradients a backend may compute half inputs in their own dtype: still within tolerance."""
    *_, n_win, topk = case
    qk, v = _qkv(case, dtype)
    q, k = qk.detach().unbind(3)
    with torch.inference_mode():
        got = bi_level_routing_attention(q, k, v.detach(), n_win, topk, scale=0.3, backend=backend)
    want = bi_level_routing_attention(q.float(), k.float(), v.detach().float(), n_win, topk, scale=0.3, backend="reference")
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=HALF_TOLERANCE[dtype], rtol=HALF_TOLERANCE[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_inside_autocast(backend):
    # training loops often call backward() inside the autocast region: the backward must still work
    case = CASES[1]
    qk, v = _qkv(case, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(case, backend, "masked", qk, v)
    qk32, v32 = (t.detach().float().requires_grad_() for t in (qk, v))
    want = _run(case, "reference", "masked", qk32, v32)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, atol=HALF_TOLERANCE[torch.bfloat16], rtol=HALF_TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_padding_is_never_read(backend):
    case = (1, 13, 17, 2, 8, (3, 4), 5)
    qk, v = _qkv(case)
    clean = _run(case, backend, "masked", qk, v)
    with _fill_padding_with_noise(1e4):
        noisy = _run(case, backend, "masked", qk, v)
    for a, b in zip(noisy, clean):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grad_and_inputs_without_grad(backend):
    case = CASES[1]
    qk, v = _qkv(case)
    q, k = qk.detach().unbind(3)
    with torch.no_grad():
        out = bi_level_routing_attention(q, k, v.detach(), case[5], case[6], backend=backend)
    want = bi_level_routing_attention(q, k, v.detach(), case[5], case[6], backend="reference")
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph_forward_and_backward(backend):
    case = CASES[1]
    *_, n_win, topk = case

    def op(qk, v):
        q, k = qk.unbind(3)
        return bi_level_routing_attention(q, k, v, n_win, topk, backend=backend)

    compiled = torch.compile(op, fullgraph=True)
    qk, v = _qkv(case)
    grad_out = torch.randn(v.shape)
    got = compiled(qk, v)
    got_grads = torch.autograd.grad(got, (qk, v), grad_out)
    want = op(qk, v)
    for a, b in zip((got, *got_grads), (want, *torch.autograd.grad(want, (qk, v), grad_out))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _selected_on(batch, height, heads, head_dim, n_win, topk, device):
    q = torch.zeros(batch, height, height, heads, head_dim, device=device)
    return select_backend(None, q, q, q, region_grid(height, height, n_win), topk, True).name


def _selected(batch, height, heads, head_dim, n_win, topk):
    return _selected_on(batch, height, heads, head_dim, n_win, topk, "cpu")


def test_auto_dispatch_on_cpu():
    # BiFormer-T stage 3 (14x14 map, 2x2-token regions, 16 of 49 routed): dense attention with a block mask
    assert _selected(8, 14, 8, 32, 7, 16) == "dense"
    # stages 1-2 (8x8 and 4x4-token regions, 1 and 4 routed): the indexed backend
    assert _selected(8, 56, 2, 32, 7, 1) == "indexed"
    assert _selected(8, 28, 4, 32, 7, 4) == "indexed"


def test_custom_op_backends_step_aside_for_export(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert _selected(1, 56, 2, 32, 7, 1) == "reference"  # indexed otherwise (see above)
    q = torch.zeros(1, 8, 8, 1, 8)
    with pytest.raises(ValueError, match="backend='indexed' cannot run.*ONNX"):
        bi_level_routing_attention(q, q, q, 4, 2, backend="indexed")


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.zeros(1, 8, 8, 1, 8, dtype=torch.float64)
    if "triton" not in BACKENDS or torch.cuda.is_available():
        pytest.skip("needs the triton backend registered and no CUDA device")
    with pytest.raises(ValueError, match="backend='triton' cannot run.*CUDA"):
        bi_level_routing_attention(q, q, q, 4, 2, backend="triton")


# --- Triton kernels in the interpreter ---------------------------------------------------------
# triton.jit picks compiled or interpreted functions when a module is imported, triton's own
# tl.max/tl.sum included, and importing torch imports triton; so TRITON_INTERPRET=1 must be set
# before the process starts. These tests run in a child pytest with it set (or directly, when
# this run already has it).

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETING, reason="runs in a child process under TRITON_INTERPRET=1: test_triton_kernels_in_interpreter"
)

TRITON_CASES = [
    (1, 8, 8, 2, 16, 4, 2),  # 2x2-token regions, several packed per tile
    (1, 9, 7, 1, 16, (3, 2), 3),  # padded map, non-square grid
    (2, 4, 4, 1, 8, 4, 5),  # 1-token regions, head dim below the 16-wide tile
    (1, 16, 16, 1, 16, 1, 1),  # one 256-token region: several tiles per region
]


@pytest.mark.skipif(not HAS_TRITON or INTERPRETING, reason="triton not installed, or this run interprets already")
def test_triton_kernels_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton_ and not in_interpreter and not on_cuda"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


@interpreted
@pytest.mark.parametrize("padding", ["masked", "legacy"])
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_equals_reference(case, padding):
    _assert_matches_reference(case, "triton", padding, v_extra=8 if case[0] == 1 else 0)


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_half_precision(dtype):
    case = TRITON_CASES[1]
    qk, v = _qkv(case, dtype)
    got = _run(case, "triton", "masked", qk, v)
    qk32, v32 = (t.detach().float().requires_grad_() for t in (qk, v))
    for g, w in zip(got, _run(case, "reference", "masked", qk32, v32)):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, atol=HALF_TOLERANCE[dtype], rtol=HALF_TOLERANCE[dtype])


@interpreted
def test_triton_head_dim_128():
    _assert_matches_reference((1, 6, 6, 1, 128, 3, 2), "triton", "masked")


@interpreted
def test_triton_torch_compile():
    case = TRITON_CASES[0]
    *_, n_win, topk = case

    def op(qk, v):
        q, k = qk.unbind(3)
        return bi_level_routing_attention(q, k, v, n_win, topk, backend="triton")

    qk, v = _qkv(case)
    grad_out = torch.randn(v.shape)
    got = torch.compile(op, fullgraph=True)(qk, v)
    want = op(qk, v)
    for a, b in zip((got, *torch.autograd.grad(got, (qk, v), grad_out)),
                    (want, *torch.autograd.grad(want, (qk, v), grad_out))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@interpreted
def test_triton_never_auto_selected_on_cpu():
    assert _selected(1, 8, 1, 16, 4, 2) != "triton"


# --- Triton kernels compiled, on a GPU ----------------------------------------------------------
# CI has no GPU; these run where one is (the device machine), on BiFormer-T stage shapes and beyond.

on_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs triton and a CUDA GPU")

CUDA_CASES = TRITON_CASES + [
    (2, 56, 56, 2, 32, 7, 1),  # BiFormer-T stage 1: 8x8-token regions
    (2, 28, 28, 4, 32, 7, 4),  # stage 2: 4x4
    (2, 14, 14, 8, 32, 7, 16),  # stage 3: 2x2, packed 16 to a tile
    (2, 30, 33, 4, 16, 7, 4),  # padded, odd
    (1, 64, 48, 2, 64, (4, 3), 3),  # 16x16-token regions: 4 tiles each
    (1, 20, 20, 2, 128, 4, 5),  # head dim 128
]


@on_cuda
@pytest.mark.parametrize("padding", ["masked", "legacy"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_triton_on_cuda_equals_reference(case, padding):
    _assert_matches_reference(case, "triton", padding, v_extra=8 if case[0] == 1 else 0, device="cuda")


@on_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [CUDA_CASES[6], CUDA_CASES[7], CUDA_CASES[9]], ids=str)
def test_triton_on_cuda_half_precision(case, dtype):
    qk, v = _qkv(case, dtype, device="cuda")
    got = _run(case, "triton", "masked", qk, v)
    qk32, v32 = (t.detach().float().requires_grad_() for t in (qk, v))
    for g, w in zip(got, _run(case, "reference", "masked", qk32, v32)):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, atol=HALF_TOLERANCE[dtype], rtol=HALF_TOLERANCE[dtype])


@on_cuda
def test_triton_on_cuda_is_auto_selected_and_compiles():
    assert _selected_on(1, 56, 2, 32, 7, 1, "cuda") == "triton"
    case = CUDA_CASES[5]
    *_, n_win, topk = case

    def op(qk, v):
        q, k = qk.unbind(3)
        return bi_level_routing_attention(q, k, v, n_win, topk)

    qk, v = _qkv(case, device="cuda")
    grad_out = torch.randn(v.shape, device="cuda")
    got = torch.compile(op, fullgraph=True)(qk, v)
    want = op(qk, v)
    for a, b in zip((got, *torch.autograd.grad(got, (qk, v), grad_out)),
                    (want, *torch.autograd.grad(want, (qk, v), grad_out))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
