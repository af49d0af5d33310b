"""What a backend declares it can do, and the one check of inputs against a declaration (as xformers' ops do)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import regions
from ..regions import RegionGrid, Routing
from .inputs import RoutedAttentionInputs


@dataclass(frozen=True)
class Backend:
    """One backend's attention function and what it can run, as data: each backend module's `BACKEND`.

    Device types are torch's (`tensor.device.type`); None stands for every device type or dtype.
    """

    name: str
    # (inputs, routed region indices (B, R, K)) -> output (B, *S, M, Dv)
    attend: Callable[[RoutedAttentionInputs, Tensor], Tensor]
    devices: tuple[str, ...] | None = None  # device types it runs on
    dtypes: tuple[torch.dtype, ...] | None = None  # dtypes of q, k, v it takes
    # device types where automatic dispatch may take it: where it was measured (docs/results.md)
    auto_devices: tuple[str, ...] | None = ()
    forward_only_on: tuple[str, ...] = ()  # device types where it has no backward
    traces: bool = False  # runs under an exporter or tracer (plain aten ops; custom ops stay opaque to ONNX)
    spatial_axes: tuple[int, ...] = (2,)  # the maps it takes: 2 spatial axes (images), 1 (sequences), 3 (volumes)
    unavailable: Callable[[], str | None] | None = None  # why it cannot run on this machine at all (None: it can)
    check: Callable[[RoutedAttentionInputs], list[str]] | None = None  # reasons the fields above cannot say
    # where automatic dispatch may take it, whether it beats the next runnable backend (None: it does)
    is_fast_for: Callable[[RoutedAttentionInputs], bool] | None = None
    route: Callable[[Tensor, Tensor, RegionGrid, int, float, bool], Routing] = regions.route  # its own routing, if any

    def unavailable_reason(self) -> str | None:
        return self.unavailable() if self.unavailable is not None else None

    def auto_dispatched_on(self, device_type: str) -> bool:
        return self.auto_devices is None or device_type in self.auto_devices


def not_supported_reasons(backend: Backend, inputs: RoutedAttentionInputs) -> list[str]:
    """Why `backend` cannot run `inputs` (empty: it can), from its declaration and its own check."""
    unavailable = backend.unavailable_reason()
    if unavailable is not None:  # nothing else applies on this machine
        return [unavailable]
    device, dtype = inputs.q.device.type, inputs.q.dtype
    reasons = []
    if inputs.grid.ndim not in backend.spatial_axes:  # its other checks may ask 2-D questions of the grid
        return [f"the map has {inputs.grid.ndim} spatial axes; {backend.name} takes "
                f"{' or '.join(map(str, backend.spatial_axes))}"]
    if backend.devices is not None and device not in backend.devices:
        reasons.append(f"inputs are on {device}; {backend.name} runs on {' and '.join(backend.devices)}")
    if backend.dtypes is not None and dtype not in backend.dtypes:
        reasons.append(f"dtype {dtype} is not one of {[str(d) for d in backend.dtypes]}")
    if device in backend.forward_only_on and inputs.needs_backward:
        reasons.append(f"{backend.name} has no backward on {device}, and autograd records here (inputs require grad)")
    if not backend.traces and inputs.exporting:
        reasons.append(f"an exporter or tracer is running, and {backend.name} does not trace: its ops would stay "
                       "opaque in the graph, with no ONNX translation")
    if backend.check is not None:
        reasons += backend.check(inputs)
    return reasons
