"""Channels-first and channels-last views of maps of any rank, as permutes with non-negative axes (the
TorchScript ONNX exporter writes movedim's negative axes into a Transpose that ONNX Runtime refuses)."""
from __future__ import annotations

from torch import Tensor


def channels_last(x: Tensor) -> Tensor:
    """(B, C, *S) -> (B, *S, C), a view."""
    return x.permute(0, *range(2, x.dim()), 1)


def channels_first(x: Tensor) -> Tensor:
    """(B, *S, C) -> (B, C, *S), a view."""
    return x.permute(0, x.dim() - 1, *range(1, x.dim() - 1))
