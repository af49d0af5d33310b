"""Exporters and tracers: when BRA runs under one, and what that asks of its sizes.

torch.export (and the dynamo ONNX exporter) see sizes as symbols and keep only standard aten ops;
torch.jit.trace (and the TorchScript ONNX exporter, which traces) records sizes as 0-d tensors and
bakes Python arithmetic on them into constants. Custom-op backends cannot run under either.
"""
from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true


def is_exporting() -> bool:
    """True under torch.export, either ONNX exporter or torch.jit.trace/script; False under plain torch.compile."""
    # dynamo of torch <= 2.11 folds torch.compiler.is_exporting() to True inside any torch.compile (seen on an
    # H200 with torch 2.11: the Triton backend refused to run in a compiled model); the flag it wraps is set by
    # torch.export (strict or not) and the dynamo ONNX exporter alone, and dynamo reads it as it is
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    exporting = torch.compiler.is_exporting() if flag is None else flag
    return bool(exporting) or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def plain_eager() -> bool:
    """True where code runs as plain eager PyTorch: not compiled by torch.compile, not recorded by an exporter or
    tracer. Eager-only fast paths ask it (in-place ops, hand-written autograd Functions, views that alias): a
    compiler plans memory and fuses by itself, and a recorded graph must be a plain function of its inputs."""
    return not (torch.compiler.is_compiling() or is_exporting())


def known_zero(value: int | torch.SymInt | torch.Tensor) -> bool:
    """Whether `value` is 0 for every input size, asked without adding a guard: a symbolic size that may be
    0 or not, or a size torch.jit.trace records (a 0-d tensor), is taken as possibly non-zero, so that the
    exported graph handles both."""
    if isinstance(value, torch.Tensor):
        return False
    return statically_known_true(value == 0)


def size_min(a: int | torch.SymInt | torch.Tensor, b: int | torch.SymInt | torch.Tensor) -> int | torch.SymInt | torch.Tensor:
    """min of two sizes, as an op in the graph where a tracer follows sizes: torch.export's symbols (sym_min) or
    torch.jit.trace's 0-d tensors (torch.minimum; the builtin min would compare once and bake the answer in)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    return torch.sym_min(a, b)


def traced_as_int(size: int | torch.SymInt | torch.Tensor) -> int | torch.SymInt:
    """A size as an int where torch.jit.trace made it a 0-d tensor, for code whose sizes may be baked into a
    trace: a traced model is then fixed to the traced input's size (torch.export's are not)."""
    return int(size) if isinstance(size, torch.Tensor) else size
