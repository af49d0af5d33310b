"""Portable backend: routed attention in plain aten ops whose sizes follow the input's, for exporters.

What automatic dispatch runs under torch.export, the ONNX exporters and torch.jit.trace. The reference's
gather and attention (in a head-first layout that ONNX Runtime runs fast), with every size computed from the
(possibly symbolic) map size, and every re-layout written as permute, copy, view. Whether a permuted tensor
reshapes as a view depends on which of its sizes are 1, and a region is 1x1 wherever a map is smaller than n_win;
torch.export asks that question of a symbolic size and bakes the answer into the graph, so that one exported at
224 px would fail on a 160 px input. A copy into the standard layout leaves nothing to ask.

Shape legend: B batch, H/W map, M heads, D head dim, R regions (rows*cols), T tokens per region
(region_h*region_w), K routed regions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..regions import RegionGrid
from .inputs import RoutedAttentionInputs
from .spec import Backend


def _standard(x: Tensor) -> Tensor:
    """A copy in the standard (row-major) layout, also where x may already have it: see the module docstring."""
    return x.clone(memory_format=torch.contiguous_format)


def head_first_regions(x: Tensor, grid: RegionGrid) -> Tensor:
    """(B, H, W, M, D) -> (B*M*R, T, D), padding as needed: the tokens of each (batch, head, region) as rows."""
    batch, _, _, heads, dim = x.shape
    x = grid.pad(x).view(batch, grid.rows, grid.region_h, grid.cols, grid.region_w, heads, dim)
    x = _standard(x.permute(0, 5, 1, 3, 2, 4, 6))  # (B, M, rows, cols, region_h, region_w, D)
    return x.view(batch * heads * grid.num_regions, grid.tokens_per_region, dim)


def from_head_first_regions(x: Tensor, grid: RegionGrid, batch: int, heads: int) -> Tensor:
    """(B, M, R, T, D) -> (B, H, W, M, D), dropping any padding: the padded map, then its H x W tokens gathered.
    (A gather rather than a crop: a cropped map's layout asks whether it was padded.)"""
    dim = x.shape[-1]
    x = x.view(batch, heads, grid.rows, grid.cols, grid.region_h, grid.region_w, dim)
    x = _standard(x.permute(0, 2, 4, 3, 5, 1, 6))  # (B, rows, region_h, cols, region_w, M, D)
    if not grid.is_padded:  # known to need no padding (a fixed-size export): the padded map is the map
        return x.view(batch, grid.height, grid.width, heads, dim)
    x = x.view(batch, grid.padded_height * grid.padded_width, heads, dim)
    inside = torch.arange(grid.height, device=x.device)[:, None] * grid.padded_width \
        + torch.arange(grid.width, device=x.device)[None, :]  # (H, W): each token's place in the padded map
    return x.index_select(1, inside.flatten()).view(batch, grid.height, grid.width, heads, dim)


def attend(inputs: RoutedAttentionInputs, indices: Tensor) -> Tensor:
    """Head-first layout throughout, so that the routed regions are gathered straight into the layout the
    matmuls take: one row gather (ONNX Gather) per k and v, and no transpose of the K-fold larger gathered
    tensors (a region-major layout needs one per tensor: a quarter of BiFormer-S's non-GEMM time in ONNX
    Runtime)."""
    q, k, v, grid, scale, masked = inputs.q, inputs.k, inputs.v, inputs.grid, inputs.scale, inputs.masked
    batch, num_regions, topk = indices.shape
    heads, tokens = q.shape[3], grid.tokens_per_region
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
BACKEND = Backend("portable", attend, traces=True)
