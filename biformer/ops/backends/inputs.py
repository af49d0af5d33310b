"""The one object every backend receives: the token half of BRA's inputs, for dispatch and for attention."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...layers.exporting import is_exporting
from ...layers.inplace import autograd_records
from ..regions import RegionGrid


@dataclass(frozen=True)
class RoutedAttentionInputs:
    """q, k (B, H, W, M, D) and v (B, H, W, M, Dv) of a map cut into `grid`'s regions; each query region attends
    to the tokens of its `topk` routed key regions. masked: padded keys take no part in attention (else they
    are attended to as zeros). scale: the logits' factor (D ** -0.5 unless the caller sets another)."""

    q: Tensor
    k: Tensor
    v: Tensor
    grid: RegionGrid
    topk: int
    masked: bool
    scale: float

    @classmethod
    def of(cls, q: Tensor, k: Tensor, v: Tensor, grid: RegionGrid, topk: int, masked: bool,
           scale: float | None = None) -> RoutedAttentionInputs:
        return cls(q, k, v, grid, topk, masked, q.shape[-1] ** -0.5 if scale is None else scale)

    @property
    def needs_backward(self) -> bool:
        """Whether autograd records this call: a backend must then have a backward."""
        return autograd_records(self.q, self.k, self.v)

    @property
    def exporting(self) -> bool:
        """Whether an exporter or tracer records this call: a backend must then trace (see `Backend.traces`)."""
        return is_exporting()
