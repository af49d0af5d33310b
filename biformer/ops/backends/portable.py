"""Portable backend: routed attention in plain aten ops whose sizes follow the input's, for exporters.

What automatic dispatch runs under torch.export, the ONNX exporters and torch.jit.trace. The reference's
gather and attention (in a head-first layout that ONNX Runtime runs fast), with every size computed from the
(possibly symbolic) map size, and every re-layout written as permute, copy, view. Whether a permuted tensor
reshapes as a view depends on which of its sizes are 1, and a region is 1x1 wherever a map is smaller than n_win;
torch.export asks that question of a symbolic size and bakes the answer into the graph, so that one exported at
224 px would fail on a 160 px input. A copy into the standard layout leaves nothing to ask.

Shape legend: B batch, S... the map's 1, 2 or 3 spatial axes, M heads, D head dim, R regions, T tokens per region,
K routed regions.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..regions import RegionGrid
from .inputs import RoutedAttentionInputs
from .spec import Backend


def _standard(x: Tensor) -> Tensor:
    """A copy in the standard (row-major) layout, also where x may already have it: see the module docstring."""
    return x.clone(memory_format=torch.contiguous_format)


def head_first_regions(x: Tensor, grid: RegionGrid) -> Tensor:
    """(B, *S, M, D) -> (B*M*R, T, D), padding as needed: the tokens of each (batch, head, region) as rows."""
    batch, heads, dim, n = x.shape[0], x.shape[-2], x.shape[-1], grid.ndim
    x = grid.pad(x).view(batch, *grid.split_shape, heads, dim)  # (B, c0, s0, c1, s1, ..., M, D)
    order = [0, 2 * n + 1, *(1 + 2 * a for a in range(n)), *(2 + 2 * a for a in range(n)), 2 * n + 2]
    x = _standard(x.permute(order))  # (B, M, c0, c1, ..., s0, s1, ..., D)
    return x.view(batch * heads * grid.num_regions, grid.tokens_per_region, dim)


def from_head_first_regions(x: Tensor, grid: RegionGrid, batch: int, heads: int) -> Tensor:
    """(B, M, R, T, D) -> (B, *S, M, D), dropping any padding: the padded map, then its tokens inside the map
    gathered. (A gather rather than a crop: a cropped map's layout asks whether it was padded.)"""
    dim, n = x.shape[-1], grid.ndim
    x = x.view(batch, heads, *grid.counts, *grid.sizes, dim)
    order = [0, *(index for a in range(n) for index in (2 + a, 2 + n + a)), 1, 2 * n + 2]
    x = _standard(x.permute(order))  # (B, c0, s0, c1, s1, ..., M, D)
    if not grid.is_padded:  # known to need no padding (a fixed-size export): the padded map is the map
        return x.view(batch, *grid.shape, heads, dim)
    x = x.view(batch, math.prod(grid.padded_shape), heads, dim)
    inside = torch.zeros((), dtype=torch.int64, device=x.device)  # each token's place in the padded map
    for axis, (size, padded) in enumerate(zip(grid.shape, grid.padded_shape)):
        coordinate = torch.arange(size, device=x.device).view([-1 if a == axis else 1 for a in range(n)])
        inside = inside * padded + coordinate
    return x.index_select(1, inside.flatten()).view(batch, *grid.shape, heads, dim)


def attend(inputs: RoutedAttentionInputs, indices: Tensor) -> Tensor:
    """Head-first layout throughout, so that the routed regions are gathered straight into the layout the
    matmuls take: one row gather (ONNX Gather) per k and v, and no transpose of the K-fold larger gathered
    tensors (a region-major layout needs one per tensor: a quarter of BiFormer-S's non-GEMM time in ONNX
    Runtime)."""
    q, k, v, grid, scale, masked = inputs.q, inputs.k, inputs.v, inputs.grid, inputs.scale, inputs.masked
    batch, num_regions, topk = indices.shape
    heads, tokens = q.shape[-2], grid.tokens_per_region
    q_rows, k_rows, v_rows = (head_first_regions(t, grid) for t in (q, k, v))  # (B*M*R, T, D)
    # the rows of k_rows/v_rows that each (batch, head, query region) attends to: its batch and head's block of
    # R regions, offset by the routed region indices
    first_region = torch.arange(batch * heads, device=q.device).view(batch, heads, 1, 1) * num_regions
    routed_rows = (first_region + indices.view(batch, 1, num_regions, topk)).flatten()  # (B*M*R*K,)

    def routed(x: Tensor) -> Tensor:  # (B*M*R, T, D) -> (B, M, R, K*T, D)
        return x.index_select(0, routed_rows).view(batch, heads, num_regions, topk * tokens, x.shape[-1])

    # matmuls and a softmax, not SDPA: SDPA's decomposition broadcasts the key mask over the T query rows
    # in a way that asks whether T is 1
    q_rows = q_rows.view(batch, heads, num_regions, tokens, q.shape[-1])  # (B, M, R, T, D)
    logits = (q_rows * scale) @ routed(k_rows).transpose(-1, -2)  # (B, M, R, T, K*T)
    if masked and grid.is_padded:
        key_valid = grid.valid_tokens(q.device)[indices].view(batch, 1, num_regions, 1, topk * tokens)
        logits = logits.masked_fill(~key_valid, float("-inf"))
    out = logits.softmax(-1) @ routed(v_rows)  # (B, M, R, T, Dv)
    return from_head_first_regions(out, grid, batch, heads)


# automatic dispatch takes it under an exporter or tracer only (`biformer.ops.backends.EXPORT_BACKEND`)
BACKEND = Backend("portable", attend, traces=True, spatial_axes=(1, 2, 3))
