"""Backend registry and dispatch for routed region attention.

Every backend computes the token-to-token half of BRA: given q, k, v and the routing that
`biformer.ops.regions.route` chose, each query region attends to the tokens of its routed
key regions. The reference backend is the specification; the others must match it.

A backend is a module-level object with
    name: str
    is_available() -> bool                    (can it be imported/used on this machine at all)
    not_supported_reasons(q, k, v, grid, topk, masked) -> list[str]   (empty: it can run)
    attend(q, k, v, indices, grid, scale, masked) -> Tensor            (B, H, W, M, Dv)
Backends are listed best first; auto-dispatch takes the first one that can run.
"""
from __future__ import annotations

import logging
from typing import Protocol

from torch import Tensor

from ..regions import RegionGrid
from . import reference

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


# Priority order, best first.
BACKENDS: dict[str, Backend] = {reference.name: reference}


def available_backends() -> list[str]:
    """Names of the backends usable on this machine, in dispatch priority order."""
    return [name for name, backend in BACKENDS.items() if backend.is_available()]


def _unsupported_reasons(
    backend: Backend, q: Tensor, k: Tensor, v: Tensor, grid: RegionGrid, topk: int, masked: bool
) -> list[str]:
    if not backend.is_available():
        return ["not available on this machine"]
    return backend.not_supported_reasons(q, k, v, grid, topk, masked)


def select_backend(
    requested: str | None, q: Tensor, k: Tensor, v: Tensor, grid: RegionGrid, topk: int, masked: bool
) -> Backend:
    """The requested backend (ValueError with reasons if it cannot run), else the best that can."""
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend={requested!r} is unknown; choose one of {sorted(BACKENDS)} or None for automatic")
        backend = BACKENDS[requested]
        reasons = _unsupported_reasons(backend, q, k, v, grid, topk, masked)
        if reasons:
            raise ValueError(f"backend={requested!r} cannot run these inputs: " + "; ".join(reasons))
        return backend
    for name, backend in BACKENDS.items():
        reasons = _unsupported_reasons(backend, q, k, v, grid, topk, masked)
        if not reasons:
            return backend
        logger.debug("BRA backend %s skipped: %s", name, "; ".join(reasons))
    raise RuntimeError("no BRA backend can run these inputs")  # unreachable: the reference runs everything
