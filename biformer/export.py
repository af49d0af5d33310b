"""Exported models: ONNX files at a fixed input size or with height and width free.

Under every exporter and tracer, BRA runs its portable formulation (`biformer.ops.backends.portable`), whose
region grid follows the input's size inside the graph. Two settings of torch.export, which the dynamo ONNX
exporter runs, make one graph serve every size: size-oblivious reasoning about backed sizes (a symbolic size is
not asked whether it is 0 or 1) and guards that become runtime asserts instead of errors (the asserts it keeps
hold for every size in range).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor, nn

from .files import atomic_output

# Sides a dynamic export accepts. At 32 px BiFormer's last map is a single token, which the exported graph
# would have to tell apart from larger maps; from 33 px up one graph serves every size.
MIN_SIDE, MAX_SIDE = 33, 4096


def dynamic_shapes() -> tuple[dict[int, torch.export.Dim], ...]:
    """Height and width of a (B, 3, H, W) input free (the batch stays the example's)."""
    return ({2: torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE),
             3: torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)},)


@contextlib.contextmanager
def one_graph_for_every_size() -> Iterator[None]:
    """Inside: torch.export reasons about sizes size-obliviously (pass it
    prefer_deferred_runtime_asserts_over_guards=True as well; the ONNX exporter does)."""
    with fx_config.patch(backed_size_oblivious=True):
        yield


def export_onnx(model: nn.Module, example: Tensor, path: Path, *, dynamic: bool = False, legacy: bool = False,
                opset: int | None = None) -> None:
    """Write an ONNX file of `model` (atomically): with the dynamo exporter, or (legacy) the TorchScript one,
    which traces, so that its file keeps `example`'s size."""
    if legacy and dynamic:
        raise ValueError("dynamic=True needs the dynamo exporter: the TorchScript exporter (legacy=True) traces, "
                         "which fixes the input size; export at the size you run, or without legacy")
    model = model.eval()
    with atomic_output(Path(path)) as partial, torch.no_grad():
        if legacy:
            torch.onnx.export(model, (example,), str(partial), dynamo=False, input_names=["images"],
                              output_names=["output"], opset_version=opset)
        else:
            with one_graph_for_every_size():
                program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=["images"],
                                            dynamic_shapes=dynamic_shapes() if dynamic else None)
            program.save(str(partial))
