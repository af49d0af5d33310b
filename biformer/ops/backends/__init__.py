"""Backend registry and dispatch for routed region attention.

Every backend computes the token-to-token half of BRA: given q, k, v and the routing that
`biformer.ops.regions.route` chose, each query region attends to the tokens of its routed
key regions. The reference backend is the specification; the others must match it.

A backend is a module-level object with
    name: str
    attend(inputs: RoutedAttentionInputs, indices (B, R, K)) -> Tensor   (B, H, W, M, Dv)
and, where it cannot run everywhere, any of
    is_available() -> bool                                   (default True: usable on this machine at all)
    unavailable_reason() -> str                              (why is_available() is False)
    not_supported_reasons(inputs) -> list[str]               (default []: it runs every input)
    is_fast_for(inputs) -> bool                              (default True: auto-dispatch takes it only where True)
    AUTO_DEVICES: tuple[str, ...]                            (default: every device; the device types where
                                                             auto-dispatch may take it: where it was measured)
    route(q, k, grid, topk, scale, masked) -> Routing        (default `biformer.ops.regions.route`: its own routing)
`inputs.masked`: padded keys take no part in attention (else they are attended to as zeros). The
padding is at the bottom/right; a backend takes the region size from the grid (grid.region_h x
grid.region_w), never from the map and the region count: the "legacy_nchw" padding mode sizes
regions differently. Backends are listed best first; auto-dispatch takes the first one that can
run and is fast for the inputs, else the first one that can run.

The backends: "triton" (fused Triton kernels, CUDA), "triton_region" (Triton kernels with one query region
per program and no wasted score entries, CUDA), "flex" (the routing as a BlockMask for torch's
compiled flex_attention; forward only on CPU), "dense" (whole-map SDPA with a region-block bias),
"indexed" (chunked gather-free attention, custom ops), "reference" (the specification), "portable" (the
reference's algorithm in ops that export at any input size; what dispatch runs under an exporter), "original"
(the original release's algorithm, a benchmark baseline).

What automatic dispatch takes, and the measurements it rests on (commands in docs/results.md): on each device
only backends measured there, so on CUDA only backends that have run on a GPU, and on other devices (mps, xpu)
the reference:

| backend | auto-dispatched where | rests on |
| --- | --- | --- |
| triton | CUDA; in training only with regions of 16+ tokens | H100 `bench op` (2026-11), H200 CUDA tests (2026-12-04) |
| triton_region | never (opt-in by name) | not yet run on a GPU: CPU interpreter tests, offline sm_90 compile |
| flex | never (opt-in by name) | H200, torch 2.11: 12 of 13 CUDA tests failed (inductor refuses 16-token blocks) |
| dense | CPU: small maps next to the routed keys | CPU `bench op`; never run on a GPU |
| indexed | CPU | CPU `bench op`; never run on a GPU |
| reference | whatever is left (it runs everything) | the specification; the oracle of the CUDA tests; H100: 10% faster than triton in training at 2x2-token regions |
| portable | under an exporter or tracer | export tests |
| original | never (a benchmark baseline) | |
"""
from __future__ import annotations

import logging
from typing import Protocol

import torch
from torch import Tensor

from ...layers.exporting import is_exporting
from . import dense, flex, indexed, original, portable, reference, triton_attention, triton_region
from .inputs import RoutedAttentionInputs

logger = logging.getLogger(__name__)


class Backend(Protocol):
    name: str

    def attend(self, inputs: RoutedAttentionInputs, indices: Tensor) -> Tensor: ...


def _is_available(backend: Backend) -> bool:
    return getattr(backend, "is_available", lambda: True)()


# Priority order, best first: the fused Triton kernels on CUDA; torch's block-sparse flex_attention
# (compiled; only forced: it failed its CUDA tests, and on CPU it has no backward and was slower); dense attention
# with a block mask where the map is small next to the routed keys; the gather-free indexed backend; the
# reference; the portable formulation, which dispatch takes only under an exporter; the original release's
# algorithm, a benchmark baseline that dispatch never reaches.
BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (triton_attention, triton_region, flex, dense, indexed, reference, portable, original)
}


# What automatic dispatch runs under an exporter or tracer (see `biformer.layers.exporting`).
EXPORT_BACKEND: Backend = portable


def available_backends() -> list[str]:
    """Names of the backends usable on this machine, in dispatch priority order."""
    return [name for name, backend in BACKENDS.items() if _is_available(backend)]


def check_backend_name(name: str | None) -> None:
    """ValueError unless `name` is a registered backend or None (automatic dispatch)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; choose one of {sorted(BACKENDS)} or None for automatic")


def _unsupported_reasons(backend: Backend, inputs: RoutedAttentionInputs) -> list[str]:
    if not _is_available(backend):
        explain = getattr(backend, "unavailable_reason", None)
        return [explain() if explain else "not available on this machine"]
    reasons = getattr(backend, "not_supported_reasons", None)
    return reasons(inputs) if reasons else []


def _debug(message: str, *args: object) -> None:
    if not torch.compiler.is_compiling():  # dynamo cannot trace logging calls (fullgraph would break)
        logger.debug(message, *args)


def select_backend(requested: str | None, inputs: RoutedAttentionInputs) -> Backend:
    """The requested backend (ValueError with reasons if it cannot run), else the best that can."""
    check_backend_name(requested)
    if requested is not None:
        backend = BACKENDS[requested]
        reasons = _unsupported_reasons(backend, inputs)
        if reasons:
            raise ValueError(f"backend={requested!r} cannot run these inputs: " + "; ".join(reasons))
        return backend
    if is_exporting():  # plain ops whose sizes follow the input's, chosen without asking a symbolic size
        return EXPORT_BACKEND
    runnable = []
    for name, backend in BACKENDS.items():
        if inputs.q.device.type not in getattr(backend, "AUTO_DEVICES", (inputs.q.device.type,)):
            continue
        reasons = _unsupported_reasons(backend, inputs)
        if reasons:
            _debug("BRA backend %s skipped: %s", name, "; ".join(reasons))
            continue
        is_fast_for = getattr(backend, "is_fast_for", None)
        if is_fast_for is None or is_fast_for(inputs):
            return backend
        _debug("BRA backend %s skipped: slower than the next for these inputs", name)
        runnable.append(backend)
    if runnable:
        return runnable[0]
    raise RuntimeError("no BRA backend can run these inputs")  # unreachable: the reference runs everything
