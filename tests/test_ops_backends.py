"""Every BRA backend against the reference backend (the original's gather algorithm): output, q/k/v
gradients, every padding mode, odd sizes, dtypes, dispatch, torch.compile.

The tests are generated from one `Target` per backend and device: the CPU backends; the Triton
kernels on CPU in Triton's interpreter (marked `interpreter`: they run in a child process under
TRITON_INTERPRET=1, see test_triton_kernels_in_interpreter); the compiled Triton kernels on a GPU
(marked `gpu`).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import pytest
import torch

from biformer.layers.exporting import is_exporting
from biformer.ops import bi_level_routing_attention
from biformer.ops.backends import BACKENDS, select_backend
from biformer.ops.backends.inputs import RoutedAttentionInputs
from biformer.ops.functional import region_grid
from biformer.ops.regions import PADDING_MODES, RegionGrid

# (batch, height, width, heads, head_dim, n_win, topk)
Case = tuple

# divisible and padded maps, non-square grids, topk=1 and topk=all, regions made only of padding,
# 2x2-token regions, one region; in "legacy_nchw" mode, regions of 11 // 2 = 5 rows, 3 of them
# (not the ceil(11 / 3) = 4 rows that the region count alone would give)
CPU_CASES: tuple[Case, ...] = (
    (2, 8, 8, 2, 4, 4, 1),
    (1, 13, 17, 2, 8, (3, 4), 5),
    (2, 7, 9, 1, 16, 3, 9),
    (1, 9, 9, 1, 8, 4, 3),
    (2, 14, 14, 4, 8, 7, 16),
    (1, 16, 16, 1, 8, 1, 1),
    (1, 11, 10, 2, 8, 2, 3),
)
# tiny: the interpreter runs the kernels one program at a time
INTERPRETER_CASES: tuple[Case, ...] = (
    (1, 8, 8, 2, 16, 4, 2),  # 2x2-token regions, several packed per tile
    (1, 9, 11, 1, 16, (3, 2), 3),  # padded map, non-square grid; "legacy_nchw": 3x3 regions of 3x5
    (2, 4, 4, 1, 8, 4, 5),  # 1-token regions, head dim below the 16-wide tile
    (1, 16, 16, 1, 16, 1, 1),  # one 256-token region: several tiles per region
    (1, 6, 6, 1, 128, 3, 2),  # head dim 128
)
CUDA_CASES: tuple[Case, ...] = INTERPRETER_CASES[:4] + (
    (2, 56, 56, 2, 32, 7, 1),  # BiFormer-T stage 1: 8x8-token regions
    (2, 28, 28, 4, 32, 7, 4),  # stage 2: 4x4
    (2, 14, 14, 8, 32, 7, 16),  # stage 3: 2x2, packed 16 to a tile
    (2, 30, 33, 4, 16, 7, 4),  # padded, odd
    (1, 64, 48, 2, 64, (4, 3), 3),  # 16x16-token regions: 4 tiles each
    (1, 20, 20, 2, 128, 4, 5),  # head dim 128
)
HALF_DTYPES = (torch.bfloat16, torch.float16)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
# half precision: gap to the float32 reference on the same (rounded) inputs; the reference's own
# bfloat16/float16 result is no closer
HALF_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
NOISE = 1e4  # magnitude of what the padding-blindness test puts where masked mode must not look

# triton.jit picks compiled or interpreted functions when a module is imported, triton's own
# tl.max/tl.sum included, and importing torch imports triton; so TRITON_INTERPRET=1 must be set
# before the process starts: the interpreter tests run in a child pytest that has it.
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Target:
    """One backend on one device, and what its tests run there.

    cases: float32 equivalence with the reference, in every padding mode, with gradients.
    dtypes: the further dtypes checked on dtype_cases (float64 against the float64 reference, half
        precision against the float32 reference); the first dtype case also runs without gradients,
        inside autocast and under torch.compile.
    backward: False for a backend with no backward on this device: the tests that need gradients
        are then reported as skipped, the forward-only ones run.
    """

    backend: str
    device: str = "cpu"
    marks: tuple[pytest.MarkDecorator, ...] = ()
    cases: tuple[Case, ...] = CPU_CASES
    dtypes: tuple[torch.dtype, ...] = (torch.float64, *HALF_DTYPES)
    dtype_cases: tuple[Case, ...] = (CPU_CASES[1], CPU_CASES[4])
    backward: bool = True

    def __str__(self) -> str:
        return f"{self.backend}-{self.device}"


INTERPRETED = Target(
    "triton",
    marks=(
        pytest.mark.interpreter,
        pytest.mark.skipif(not INTERPRETING, reason="runs in a child process: test_triton_kernels_in_interpreter"),
    ),
    cases=INTERPRETER_CASES, dtypes=HALF_DTYPES, dtype_cases=INTERPRETER_CASES[1:2],
)
ON_CUDA = Target(
    "triton", "cuda", marks=(pytest.mark.gpu, pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")),
    cases=CUDA_CASES, dtypes=HALF_DTYPES, dtype_cases=(CUDA_CASES[6], CUDA_CASES[7], CUDA_CASES[9]),  # stage 3, odd, 128
)
# flex on CPU: a compiled forward only (no backward, no float64), about 10 s of compilation per shape
# and dtype, so one case here (shapes shared with tests/test_ops_flex.py, which tests it in full)
FLEX_ON_CPU = Target("flex", cases=CPU_CASES[1:2], dtypes=HALF_DTYPES, dtype_cases=CPU_CASES[1:2], backward=False)
# the Triton backends: the same cases for both kernels
TRITON_BACKENDS = ("triton", "triton_region")
TARGETS = [Target(name) for name in BACKENDS if name not in ("reference", "flex", *TRITON_BACKENDS)] + [
    FLEX_ON_CPU, *(replace(target, backend=name) for name in TRITON_BACKENDS for target in (INTERPRETED, ON_CUDA))]


def over_targets(
    argnames: Sequence[str] = (), values: Callable[[Target], Iterable[tuple]] = lambda target: [()],
    targets: Sequence[Target] = TARGETS, backward: bool = True,
):
    """Parametrize a test over `targets` (with their marks) and, per target, the argument tuples `values` gives.

    backward: the test takes gradients; it is skipped, with the reason, on targets without a backward.
    """
    def marks(target: Target) -> tuple[pytest.MarkDecorator, ...]:
        if backward and not target.backward:
            no_backward = f"{target} has no backward (its forward is tested without gradients)"
            return (*target.marks, pytest.mark.skip(reason=no_backward))
        return target.marks

    params = [
        pytest.param(target, *args, marks=marks(target), id="-".join([str(target), *map(str, args)]))
        for target in targets for args in values(target)
    ]
    return pytest.mark.parametrize(["target", *argnames], params)


def _is_padded(case: Case) -> bool:
    _, height, width, _, _, n_win, _ = case
    return region_grid((height, width), n_win).is_padded


def _with_margin(x: torch.Tensor, noise: float) -> torch.Tensor:
    """x as a view of a leaf 8 tokens taller and wider, randn * noise beyond x: a kernel that
    addresses tokens by strides reads that margin where it loads padding."""
    height, width = x.shape[1:3]
    big = torch.randn(x.shape[0], height + 8, width + 8, *x.shape[3:], dtype=x.dtype, device=x.device) * noise
    big[:, :height, :width] = x
    return big.requires_grad_()[:, :height, :width]


def _qkv(case: Case, dtype=torch.float32, device="cpu", margin_noise: float | None = None):
    """q, k as views of one packed qkv, the layout BiLevelRoutingAttention passes, and v (a wider
    head dim in one-image cases): leaves, or with margin_noise views of larger leaves (`_with_margin`)."""
    batch, height, width, heads, head_dim, _, _ = case
    gen = torch.Generator().manual_seed(0)
    qk = torch.randn(batch, height, width, 2, heads, head_dim, generator=gen, dtype=dtype).to(device)
    v = torch.randn(batch, height, width, heads, head_dim + 8 * (batch == 1), generator=gen, dtype=dtype).to(device)
    if margin_noise is not None:
        return _with_margin(qk, margin_noise), _with_margin(v, margin_noise)
    return qk.requires_grad_(), v.requires_grad_()


def _run(case: Case, backend: str | None, padding: str, qk, v):
    """Output and the gradients of qk and v for a fixed random output gradient."""
    *_, n_win, topk = case
    q, k = qk.unbind(3)
    out = bi_level_routing_attention(q, k, v, n_win, topk, scale=0.3, padding=padding, backend=backend)
    # drawn in float32 and rounded, so that a half-precision run and its float32 reference get the
    # same gradient (randn's half-precision streams differ between torch builds)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    return (out, *torch.autograd.grad(out, (qk, v), grad_out))


def _assert_matches_reference(target: Target, case: Case, padding: str, dtype=torch.float32):
    qk, v = _qkv(case, dtype, target.device)
    tol = TOLERANCE[dtype]
    for got, want in zip(_run(case, target.backend, padding, qk, v), _run(case, "reference", padding, qk, v)):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def _assert_half_matches_float32(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], dtype: torch.dtype):
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, atol=HALF_TOLERANCE[dtype], rtol=HALF_TOLERANCE[dtype])


def _float32_reference(case: Case, qk, v):
    qk32, v32 = (t.detach().float().requires_grad_() for t in (qk, v))
    return _run(case, "reference", "masked", qk32, v32)


def _assert_compiled_matches_eager(case: Case, backend: str | None, device: str):
    *_, n_win, topk = case

    def op(qk, v):
        q, k = qk.unbind(3)
        return bi_level_routing_attention(q, k, v, n_win, topk, backend=backend)

    qk, v = _qkv(case, device=device)
    grad_out = torch.randn(v.shape, device=device)
    got = torch.compile(op, fullgraph=True)(qk, v)
    want = op(qk, v)
    for a, b in zip((got, *torch.autograd.grad(got, (qk, v), grad_out)),
                    (want, *torch.autograd.grad(want, (qk, v), grad_out))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@over_targets(["case", "padding"], lambda target: [(case, mode) for case in target.cases for mode in PADDING_MODES])
def test_equals_reference(target, case, padding):
    _assert_matches_reference(target, case, padding)


@over_targets(["case"], lambda target: [(case,) for case in target.dtype_cases if torch.float64 in target.dtypes])
def test_float64(target, case):
    _assert_matches_reference(target, case, "masked", dtype=torch.float64)


def _half_cases(target: Target) -> list[tuple]:
    return [(dtype, case) for dtype in target.dtypes if dtype in HALF_DTYPES for case in target.dtype_cases]


@over_targets(["dtype", "case"], _half_cases)
def test_half_precision(target, dtype, case):
    """Within HALF_TOLERANCE of the float32 reference, or at least as close to it as the reference's own run in
    this dtype: with 128-wide heads, gradients grow to about 12; there the Triton kernels were 0.057 (bfloat16)
    and 0.0053 (float16) from float32 on an H200, and the reference's own half-precision run is 0.13 and 0.010 on
    a CPU (on a GPU not yet measured)."""
    qk, v = _qkv(case, dtype, target.device)
    got, want = _run(case, target.backend, "masked", qk, v), _float32_reference(case, qk, v)
    own = _run(case, "reference", "masked", *_qkv(case, dtype, target.device))
    for g, w, o in zip(got, want, own):
        assert g.dtype == dtype
        if not torch.allclose(g.float(), w, atol=HALF_TOLERANCE[dtype], rtol=HALF_TOLERANCE[dtype]):
            assert (g.float() - w).abs().max() <= (o.float() - w).abs().max(), f"{dtype}: further from float32 " \
                f"than the reference's own {dtype} run ({(g.float() - w).abs().max():.4g} > {(o.float() - w).abs().max():.4g})"


@over_targets(["dtype", "case"], _half_cases, backward=False)
def test_half_precision_inference(target, dtype, case):
    """Without gradients a backend may compute half inputs in their own dtype: still within tolerance."""
    *_, n_win, topk = case
    qk, v = _qkv(case, dtype, target.device)
    q, k = qk.detach().unbind(3)
    with torch.inference_mode():
        got = bi_level_routing_attention(q, k, v.detach(), n_win, topk, scale=0.3, backend=target.backend)
    want = bi_level_routing_attention(q.float(), k.float(), v.detach().float(), n_win, topk, scale=0.3,
                                      backend="reference")
    _assert_half_matches_float32([got], [want], dtype)


@over_targets(values=lambda target: [()] * (torch.bfloat16 in target.dtypes))
def test_backward_inside_autocast(target):
    # training loops often call backward() inside the autocast region: the backward must still work
    case = target.dtype_cases[0]
    qk, v = _qkv(case, torch.bfloat16, target.device)
    with torch.autocast(target.device, dtype=torch.bfloat16):
        got = _run(case, target.backend, "masked", qk, v)
    _assert_half_matches_float32(got, _float32_reference(case, qk, v), torch.bfloat16)


def _fill_padding_with_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make RegionGrid.pad, with which the backends pad q, k, v, put large noise in the padding."""
    zero_pad = RegionGrid.pad

    def noisy_pad(grid: RegionGrid, x: torch.Tensor) -> torch.Tensor:
        padded = zero_pad(grid, x)
        inside = torch.zeros(padded.shape[1:3], dtype=torch.bool, device=x.device)
        inside[: grid.height, : grid.width] = True
        inside = inside.view(1, *inside.shape, *[1] * (padded.dim() - 3))
        return torch.where(inside, padded, torch.randn_like(padded) * NOISE)

    monkeypatch.setattr(RegionGrid, "pad", noisy_pad)


@over_targets(["case"], lambda target: [(case,) for case in target.cases if _is_padded(case)],
              targets=[Target("reference"), *TARGETS])
def test_masked_padding_is_never_read(target, case, monkeypatch):
    """Masked mode gives the same outputs and gradients with noise in the padding: where the
    backends pad (RegionGrid.pad) and in memory beyond the map (for kernels that load by strides)."""
    clean = _run(case, target.backend, "masked", *_qkv(case, device=target.device, margin_noise=0.0))
    _fill_padding_with_noise(monkeypatch)
    noisy = _run(case, target.backend, "masked", *_qkv(case, device=target.device, margin_noise=NOISE))
    for a, b in zip(noisy, clean):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_padding_noise_reaches_legacy_mode(monkeypatch):
    """The noise of test_masked_padding_is_never_read is really there: legacy mode attends to it."""
    case = CPU_CASES[1]
    clean = _run(case, "reference", "legacy", *_qkv(case))[0]
    _fill_padding_with_noise(monkeypatch)
    assert not torch.allclose(_run(case, "reference", "legacy", *_qkv(case))[0], clean, atol=1e-3)


@over_targets(backward=False)
def test_no_grad_and_inputs_without_grad(target):
    case = target.dtype_cases[0]
    *_, n_win, topk = case
    qk, v = _qkv(case, device=target.device)
    q, k = qk.detach().unbind(3)
    with torch.no_grad():
        out = bi_level_routing_attention(q, k, v.detach(), n_win, topk, backend=target.backend)
    want = bi_level_routing_attention(q, k, v.detach(), n_win, topk, backend="reference")
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@over_targets()
def test_torch_compile_fullgraph_forward_and_backward(target):
    _assert_compiled_matches_eager(target.dtype_cases[0], target.backend, target.device)


def _selected_on(batch, height, heads, head_dim, n_win, topk, device="cpu"):
    q = torch.zeros(batch, height, height, heads, head_dim, device=device)
    return select_backend(None, RoutedAttentionInputs.of(q, q, q, region_grid((height, height), n_win), topk, True)).name


def test_auto_dispatch_on_cpu():
    # BiFormer-T stage 3 (14x14 map, 2x2-token regions, 16 of 49 routed): dense attention with a block mask
    assert _selected_on(8, 14, 8, 32, 7, 16) == "dense"
    # stages 1-2 (8x8 and 4x4-token regions, 1 and 4 routed): the indexed backend
    assert _selected_on(8, 56, 2, 32, 7, 1) == "indexed"
    assert _selected_on(8, 28, 4, 32, 7, 4) == "indexed"


@over_targets(targets=[INTERPRETED])
def test_triton_never_auto_selected_on_cpu(target):
    assert _selected_on(1, 8, 1, 16, 4, 2) != "triton"


@pytest.mark.slow
@over_targets(targets=[ON_CUDA])
def test_triton_auto_selected_on_cuda_and_compiles(target):
    assert _selected_on(1, 56, 2, 32, 7, 1, "cuda") == "triton"
    _assert_compiled_matches_eager(CUDA_CASES[5], None, "cuda")  # dispatch traced by torch.compile


def test_custom_op_backends_step_aside_for_export(monkeypatch):
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", True, raising=False)  # what torch.export sets
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert _selected_on(1, 56, 2, 32, 7, 1) == "portable"  # indexed otherwise (see above)
    q = torch.zeros(1, 8, 8, 1, 8)
    with pytest.raises(ValueError, match="backend='indexed' cannot run.*ONNX"):
        bi_level_routing_attention(q, q, q, 4, 2, backend="indexed")


def test_compile_is_not_export(monkeypatch):
    """torch <= 2.11's dynamo answers torch.compiler.is_exporting() with True inside any torch.compile (the
    Triton backend then refused a compiled model on an H200); torch.export's own flag decides instead."""
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)  # as dynamo 2.11 folds it
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", False, raising=False)
    assert _selected_on(1, 56, 2, 32, 7, 1) == "indexed"

    class Exporting(torch.nn.Module):
        def forward(self, x):
            return x + is_exporting()

    monkeypatch.undo()
    assert torch.compile(Exporting(), fullgraph=True, backend="eager")(torch.zeros(1)).item() == 0
    assert torch.export.export(Exporting(), (torch.zeros(1),)).module()(torch.zeros(1)).item() == 1


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.zeros(1, 8, 8, 1, 8, dtype=torch.float64)
    if "triton" not in BACKENDS or torch.cuda.is_available():
        pytest.skip("needs the triton backend registered and no CUDA device")
    with pytest.raises(ValueError, match="backend='triton' cannot run.*CUDA"):
        bi_level_routing_attention(q, q, q, 4, 2, backend="triton")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON or INTERPRETING, reason="triton not installed, or this run interprets already")
def test_triton_kernels_in_interpreter(tmp_path):
    """The `interpreter` tests (here and the N-D ones of test_ops_nd.py), in a child pytest under
    TRITON_INTERPRET=1: all must run and pass."""
    report = tmp_path / "interpreter.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "interpreter", f"--junitxml={report}",
         __file__, os.path.join(os.path.dirname(__file__), "test_ops_nd.py")],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    suite = ElementTree.parse(report).getroot().find("testsuite")
    ran, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    assert ran > 0 and skipped == 0, f"the child reported {ran} tests, {skipped} of them skipped:\n" + result.stdout[-2000:]


def test_inverse_routing_lists_the_query_regions_of_each_key_region():
    """The Triton backward's CSR against the definition: key region j of batch b is routed to by exactly the
    query regions r with j in indices[b, r], in ascending order."""
    from biformer.ops.backends.triton_attention import inverse_routing

    generator = torch.Generator().manual_seed(0)
    batch, regions, topk = 3, 9, 4
    indices = torch.stack([torch.randperm(regions, generator=generator)[:topk] for _ in range(batch * regions)])
    indices = indices.view(batch, regions, topk)
    routed_by, start = inverse_routing(indices)
    assert start.shape == (batch * regions + 1,) and start[-1] == routed_by.numel() == batch * regions * topk
    for b in range(batch):
        for j in range(regions):
            want = [r for r in range(regions) if j in indices[b, r].tolist()]
            assert routed_by[start[b * regions + j]:start[b * regions + j + 1]].tolist() == want


_REGION_INTERPRETED = replace(INTERPRETED, backend="triton_region")


@over_targets(["case", "padding", "dtype"], lambda target: [
    (case, padding, dtype) for case in CPU_CASES for padding in PADDING_MODES for dtype in (torch.float32, torch.bfloat16)
], targets=[_REGION_INTERPRETED])
def test_fused_routing_matches_the_specification(target, case, padding, dtype):
    """triton_region's one-launch routing against `regions.route` (the specification): the same logits, top-k
    sets of the same logits (padding-only query regions tie everywhere, so their order is free), the same
    weights."""
    from biformer.ops.backends import triton_region
    from biformer.ops.regions import padding_mode, route

    batch, height, width, heads, head_dim, n_win, topk = case
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(batch, height, width, heads, head_dim, generator=generator).to(dtype) for _ in range(2))
    grid = region_grid((height, width), n_win, padding)
    masked = padding_mode(padding).mask_routing
    want = route(q, k, grid, topk, head_dim**-0.5, masked)
    got = triton_region.route(q, k, grid, topk, head_dim**-0.5, masked)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(want.logits.gather(-1, got.indices), want.logits.gather(-1, want.indices))
    assert all(len(set(row)) == topk for row in got.indices.flatten(0, 1).tolist())
    torch.testing.assert_close(got.weights, want.weights, atol=1e-6, rtol=1e-5)


@over_targets(targets=[_REGION_INTERPRETED])
def test_bra_takes_the_routing_of_the_chosen_backend(target, monkeypatch):
    from biformer.ops.regions import route as route_spec

    calls = []
    counted = replace(BACKENDS["triton_region"], route=lambda *args: calls.append(1) or route_spec(*args))
    monkeypatch.setitem(BACKENDS, "triton_region", counted)

    q = torch.randn(1, 8, 8, 1, 16)
    bi_level_routing_attention(q, q, q, 4, 2, backend="triton_region")
    assert calls == [1]


@over_targets(["shape"], lambda target: [((3, 9, 4),), ((2, 49, 16),), ((1, 49, 1),), ((2, 12, 12),), ((1, 1, 1),)],
              targets=[_REGION_INTERPRETED])
def test_one_launch_inverse_routing_lists_the_query_regions_of_each_key_region(target, shape):
    from biformer.ops.backends.triton_region import triton_region_inverse_routing

    batch, regions, topk = shape
    generator = torch.Generator().manual_seed(1)
    indices = torch.stack([torch.randperm(regions, generator=generator)[:topk] for _ in range(batch * regions)])
    routed_by, start = triton_region_inverse_routing(indices.view(batch, regions, topk))
    indices = indices.view(batch, regions, topk)
    assert start.tolist()[-1] == routed_by.numel() == batch * regions * topk
    for b in range(batch):
        for j in range(regions):
            want = [r for r in range(regions) if j in indices[b, r].tolist()]
            assert routed_by[start[b * regions + j]:start[b * regions + j + 1]].tolist() == want


@pytest.mark.parametrize("grad", [False, True])
def test_auto_dispatch_on_cuda_takes_only_backends_run_on_a_gpu(monkeypatch, grad):
    """Fake CUDA tensors (no GPU needed): triton where it is fast, else the reference; never dense, indexed,
    flex or triton_region, which have not run on a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setitem(BACKENDS, "triton", replace(BACKENDS["triton"], unavailable=None))  # as on a GPU machine
    picked = {}
    with FakeTensorMode():
        for stage, (size, heads, topk) in {"1": (56, 2, 1), "2": (28, 4, 4), "3": (14, 8, 16)}.items():
            q = torch.zeros(8, size, size, heads, 32, device="cuda", requires_grad=grad)
            grid = region_grid((size, size), 7)
            picked[stage] = select_backend(None, RoutedAttentionInputs.of(q, q, q, grid, topk, True)).name
    # training with 2x2-token regions: the reference (measured 10% faster there than triton on an H100)
    assert picked == {"1": "triton", "2": "triton", "3": "reference" if grad else "triton"}


@over_targets(targets=[_REGION_INTERPRETED])
def test_region_backend_beyond_its_fused_routing(target):
    """81 regions (more than MAX_FUSED_REGIONS): the plain-op routing and CSR, with the same kernels."""
    from biformer.ops.backends import triton_region

    case = (1, 18, 18, 1, 16, 9, 3)
    assert 9 * 9 > triton_region.MAX_FUSED_REGIONS
    _assert_matches_reference(target, case, "masked")


@over_targets(targets=[_REGION_INTERPRETED])
def test_fused_routing_ranks_nan_last_and_stays_in_range(target):
    from biformer.ops.backends import triton_region

    q = torch.randn(1, 8, 8, 1, 16)
    q[0, 0, 0, 0, 0] = float("nan")  # region 0's mean, and so its row of logits, is NaN
    routing = triton_region.route(q, torch.randn(1, 8, 8, 1, 16), region_grid((8, 8), 4), 3, 0.25, True)
    assert routing.indices.min() >= 0 and routing.indices.max() < 16
    assert all(len(set(row)) == 3 for row in routing.indices[0].tolist())
