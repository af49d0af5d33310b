"""Autocast's weight casts, done once for many layers: one concatenation, one cast, views.

Under autocast, every Linear and conv casts its float32 weight and bias to the autocast dtype where it runs:
one kernel per tensor, and in the backward one more to bring its gradient back to float32. BiFormer-S has
twelve such tensors per block (pos-embed and lepe convs, qkv, proj, fc1, fc2), about 740 cast kernels per
training step, a third of all its launches on a GPU. `weights_cast_once` casts all of a module's at once, as
FSDP's mixed precision casts a flat parameter: the weights are concatenated, cast in one kernel, and handed to
the layers as views of the result; in the backward their gradients come back through one cast kernel too.
The values are autocast's own (the same rounding of the same tensors); the extra work is one copy of the
float32 weights each way, small beside a step's activations.

While the context is open, the layers' weights and biases are those views (`layer.weight` is a half-precision
tensor, also to hooks, `parameters()` and `state_dict()`, so the model must not run in two threads at once);
the Parameters are back when it closes, and their gradients accumulate as usual, all of a module's at the end
of its backward (under DistributedDataParallel, a stage's all-reduce starts after the stage's backward).
Frozen parameters are left to autocast.

Only on CUDA (`DEVICES`), where each kernel launch costs microseconds of host time: on the CPU the extra copy
costs more than the casts it saves (biformer_small, bfloat16 inference at batch 1 on 2 cores: 71 ms with
autocast's casts, 98 ms with one cast per stage).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .exporting import plain_eager

__all__ = ["DEVICES", "weights_cast_once"]

DEVICES = {"cuda"}  # device types where the casts are made at once

# layers whose op autocast runs in its lower precision on every device (linear, conv*)
_CAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_HALF = (torch.float16, torch.bfloat16)


def _cast_parameters(module: nn.Module, device: torch.device) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(layer, name, parameter) of every float32 weight and bias autocast would cast below `module`; where
    autograd records, only those that train (a frozen one in the concatenation would get a gradient)."""
    training = torch.is_grad_enabled()
    return [
        (layer, name, parameter)
        for layer in module.modules() if isinstance(layer, _CAST_LAYERS)
        for name in ("weight", "bias")
        if (parameter := layer._parameters.get(name)) is not None and parameter.dtype == torch.float32
        and parameter.device == device and (parameter.requires_grad or not training)
    ]


@contextlib.contextmanager
def weights_cast_once(module: nn.Module, device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Inside, the Linear and conv layers below `module` hold their weights and biases already cast to the
    autocast dtype of `device` (see the module docstring). Does nothing unless `device` is of a type in
    `DEVICES` and autocast to float16 or bfloat16 is on there, or under torch.compile (the compiler places
    casts itself) or an exporter."""
    active = enabled and device.type in DEVICES and torch.is_autocast_enabled(device.type) \
        and torch.get_autocast_dtype(device.type) in _HALF and plain_eager()
    entries = _cast_parameters(module, device) if active else []
    if not entries:
        yield
        return
    dtype = torch.get_autocast_dtype(device.type)
    flat = torch.cat([parameter.reshape(-1) for _, _, parameter in entries]).to(dtype)
    pieces = flat.split([parameter.numel() for _, _, parameter in entries])
    try:
        for (layer, name, parameter), piece in zip(entries, pieces):
            layer._parameters[name] = piece.view(parameter.shape)  # not setattr: a plain tensor stands in
        yield
    finally:
        for layer, name, parameter in entries:
            layer._parameters[name] = parameter
