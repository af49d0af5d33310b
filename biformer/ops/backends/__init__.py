"""Backend registry and dispatch for routed region attention.

Every backend computes the token-to-token half of BRA: given q, k, v and the routing that
`biformer.ops.regions.route` chose, each query region attends to the tokens of its routed
key regions. The reference backend is the specification; the others must match it.

A backend is a module-level object with
    name: str
    is_available() -> bool                    (can it be imported/used on this machine at all)
    not_supported_reasons(q, k, v, grid, topk, masked) -> list[str]   (empty: it can run)
    attend(q, k, v, indices, grid, scale, masked) -> Tensor            (B, H, W, M, Dv)
and optionally
    is_fast_for(q, k, v, grid, topk, masked) -> bool   (auto-dispatch takes it only where True)
    unavailable_reason() -> str                        (why is_available() is False)
`masked`: padded keys take no part in attention (else they are attended to as zeros). The
padding is at the bottom/right; a backend takes the region size from the grid (grid.region_h x
grid.region_w), never from the map and the region count: the "legacy_nchw" padding mode sizes
regions differently. Backends are listed best first; auto-dispatch takes the first one that can
run and is fast for the inputs, else the first one that can run.

The backends: "triton" (fused Triton kernels, CUDA), "flex" (the routing as a BlockMask for torch's
compiled flex_attention; forward only on CPU), "dense" (whole-map SDPA with a region-block bias),
"indexed" (chunked gather-free attention, custom ops), "reference" (the specification), "original"
(the original release's algorithm, a benchmark baseline).
"""
from __future__ import annotations

import logging
from typing import Protocol

import torch
from torch import Tensor

from ..regions import RegionGrid
from . import dense, flex, indexed, original, reference, triton_attention

logger = logging.getLogger(__name__)


class Backend(Protocol):
    name: str

    def is_available(self) -> bool: ...

    def not_supported_reasons(
        self, q: Tensor, k: Tensor, v: Tensor, grid: RegionGrid, topk: int, masked: bool
    ) -> list[str]: ...

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, indices: Tensor, grid: RegionGrid, scale: float, masked: bool
    ) -> Tensor: ...


# Priority order, best first: the fused Triton kernels on CUDA; torch's block-sparse flex_attention
# (compiled; on CUDA, and on CPU only forced: it has no CPU backward and was slower there); dense attention
# with a block mask where the map is small next to the routed keys; the gather-free indexed backend; the
# reference; the original release's algorithm, a benchmark baseline that dispatch never reaches.
BACKENDS: dict[str, Backend] = {
    backend.name: backend for backend in (triton_attention, flex, dense, indexed, reference, original)
}


def available_backends() -> list[str]:
    """Names of the backends usable on this machine, in dispatch priority order."""
    return [name for name, backend in BACKENDS.items() if backend.is_available()]


def check_backend_name(name: str | None) -> None:
    """ValueError unless `name` is a registered backend or None (automatic dispatch)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; choose one of {sorted(BACKENDS)} or None for automatic")


def _unsupported_reasons(
    backend: Backend, q: Tensor, k: Tensor, v: Tensor, grid: RegionGrid, topk: int, masked: bool
) -> list[str]:
    if not backend.is_available():
        explain = getattr(backend, "unavailable_reason", None)
        return [explain() if explain else "not available on this machine"]
    return backend.not_supported_reasons(q, k, v, grid, topk, masked)


def _debug(message: str, *args: object) -> None:
    if not torch.compiler.is_compiling():  # dynamo cannot trace logging calls (fullgraph would break)
        logger.debug(message, *args)


def select_backend(
    requested: str | None, q: Tensor, k: Tensor, v: Tensor, grid: RegionGrid, topk: int, masked: bool
) -> Backend:
    """The requested backend (ValueError with reasons if it cannot run), else the best that can."""
    check_backend_name(requested)
    if requested is not None:
        backend = BACKENDS[requested]
        reasons = _unsupported_reasons(backend, q, k, v, grid, topk, masked)
        if reasons:
            raise ValueError(f"backend={requested!r} cannot run these inputs: " + "; ".join(reasons))
        return backend
    runnable = []
    for name, backend in BACKENDS.items():
        reasons = _unsupported_reasons(backend, q, k, v, grid, topk, masked)
        if reasons:
            _debug("BRA backend %s skipped: %s", name, "; ".join(reasons))
            continue
        is_fast_for = getattr(backend, "is_fast_for", None)
        if is_fast_for is None or is_fast_for(q, k, v, grid, topk, masked):
            return backend
        _debug("BRA backend %s skipped: slower than the next for these inputs", name)
        runnable.append(backend)
    if runnable:
        return runnable[0]
    raise RuntimeError("no BRA backend can run these inputs")  # unreachable: the reference runs everything
