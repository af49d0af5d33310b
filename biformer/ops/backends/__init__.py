"""Backend registry and dispatch for routed region attention.

Every backend computes the token-to-token half of BRA: given q, k, v and the routing that
`biformer.ops.regions.route` chose, each query region attends to the tokens of its routed
key regions. The reference backend is the specification; the others must match it.

Each backend module declares a `Backend` (`spec`): its attend function and, as data, the devices and dtypes it
takes, where automatic dispatch may take it, where it has no backward, whether it traces, and checks for what data
cannot say; one generic `not_supported_reasons` reads every declaration.
`inputs.masked`: padded keys take no part in attention (else they are attended to as zeros). The
padding is at the end of each axis (an image's bottom/right); a backend takes the region size from the grid
(grid.sizes), never from the map and the region count: the "legacy_nchw" padding mode sizes
regions differently. Automatic dispatch tries the backends in `PRIORITY` order and takes the first one that
may be taken on the inputs' device, can run and is fast for the inputs, else the first one that can run; under
an exporter or tracer it takes `EXPORT_BACKEND`.

The backends: "triton" (fused Triton kernels, CUDA), "triton_region" (Triton kernels with one query region
per program and no wasted score entries, CUDA), "flex" (the routing as a BlockMask for torch's
compiled flex_attention; forward only on CPU), "dense" (whole-map SDPA with a region-block bias),
"indexed" (chunked gather-free attention, custom ops), "reference" (the specification), "portable" (the
reference's algorithm in ops that export at any input size; what dispatch runs under an exporter), "original"
(the original release's algorithm, a benchmark baseline).

What automatic dispatch takes, and the measurements it rests on (figures and commands in docs/results.md): on each
device only backends measured there, so on CUDA only backends that have run on a GPU, and on other devices (mps,
xpu) the reference:

| backend | auto-dispatched where | rests on |
| --- | --- | --- |
| triton | CUDA; in training only with regions of 16+ tokens | H100 `bench op`, H200 CUDA tests |
| triton_region | never (opt-in by name) | not yet run on a GPU: CPU interpreter tests, offline sm_90 compile |
| flex | never (opt-in by name) | its H200 CUDA tests failed (inductor refuses 16-token blocks); slower on CPU |
| dense | CPU: small maps next to the routed keys | CPU `bench op`; never run on a GPU |
| indexed | CPU | CPU `bench op`; never run on a GPU |
| reference | whatever is left (it runs everything) | the specification; the oracle of the CUDA tests; H100: 10% faster than triton in training at 2x2-token regions |
| portable | under an exporter or tracer | export tests |
| original | never (a benchmark baseline) | |
"""
from __future__ import annotations

import logging

import torch

from . import dense, flex, indexed, original, portable, reference, triton_attention, triton_region
from .inputs import RoutedAttentionInputs
from .spec import Backend, not_supported_reasons

logger = logging.getLogger(__name__)

# Dispatch priority, best first: the fused Triton kernels on CUDA; torch's block-sparse flex_attention (only forced);
# dense attention with a block mask where the map is small next to the routed keys; the gather-free indexed backend;
# the reference; the portable formulation, which dispatch takes only under an exporter; the original release's
# algorithm, a benchmark baseline that dispatch never reaches.
PRIORITY: tuple[str, ...] = ("triton", "triton_region", "flex", "dense", "indexed", "reference", "portable", "original")

# Every backend by name, listed in PRIORITY's order (a backend missing there fails the import). Dispatch looks each
# one up here at every call, so that a test or a trace may swap a declaration.
_MODULES = (dense, flex, indexed, original, portable, reference, triton_attention, triton_region)
BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in sorted((module.BACKEND for module in _MODULES), key=lambda backend: PRIORITY.index(backend.name))
}

# What automatic dispatch runs under an exporter or tracer (see `biformer.layers.exporting`): plain ops whose sizes
# follow the input's, chosen without asking a symbolic size.
EXPORT_BACKEND = "portable"


class BackendUnsupported(ValueError):
    """A forced backend that cannot run the inputs: its reasons, and every other backend's (empty: it can run)."""

    def __init__(self, name: str, reasons: list[str], others: dict[str, list[str]]) -> None:
        self.name, self.reasons, self.others = name, reasons, others
        listed = ", ".join(f"{other} ({'; '.join(why) or 'can run'})" for other, why in others.items())
        super().__init__(f"backend={name!r} cannot run these inputs: {'; '.join(reasons)} (the other backends here: "
                         f"{listed})")


def available_backends() -> list[str]:
    """Names of the backends usable on this machine, in dispatch priority order."""
    return [name for name in PRIORITY if BACKENDS[name].unavailable_reason() is None]


def check_backend_name(name: str | None) -> None:
    """ValueError unless `name` is a registered backend or None (automatic dispatch)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; choose one of {sorted(BACKENDS)} or None for automatic")


def _debug(message: str, *args: object) -> None:
    if not torch.compiler.is_compiling():  # dynamo cannot trace logging calls (fullgraph would break)
        logger.debug(message, *args)


def select_backend(requested: str | None, inputs: RoutedAttentionInputs) -> Backend:
    """The requested backend (`BackendUnsupported`, a ValueError, if it cannot run), else the best that can."""
    check_backend_name(requested)
    if requested is not None:
        reasons = not_supported_reasons(BACKENDS[requested], inputs)
        if reasons:
            raise BackendUnsupported(requested, reasons, {
                name: not_supported_reasons(BACKENDS[name], inputs) for name in PRIORITY if name != requested})
        return BACKENDS[requested]
    if inputs.exporting:
        return BACKENDS[EXPORT_BACKEND]
    runnable = []
    for name in PRIORITY:
        backend = BACKENDS[name]
        if not backend.auto_dispatched_on(inputs.q.device.type):
            continue
        reasons = not_supported_reasons(backend, inputs)
        if reasons:
            _debug("BRA backend %s skipped: %s", name, "; ".join(reasons))
            continue
        if backend.is_fast_for is None or backend.is_fast_for(inputs):
            return backend
        _debug("BRA backend %s skipped: slower than the next for these inputs", name)
        runnable.append(backend)
    if runnable:
        return runnable[0]
    raise RuntimeError("no BRA backend can run these inputs")  # unreachable: the reference runs everything
