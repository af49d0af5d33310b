"""Portable backend: routed attention in plain aten ops whose sizes follow the input's, for exporters.

What automatic dispatch runs under torch.export, the ONNX exporters and torch.jit.trace. The reference's
gather and attention, with every size computed from the (possibly symbolic) map size, and every
re-layout written as permute, copy, view. Whether a permuted tensor reshapes as a view depends on which of
its sizes are 1, and a region is 1x1 wherever a map is smaller than n_win; torch.export asks that question
of a symbolic size and bakes the answer into the graph, so that one exported at 224 px would fail on a
160 px input. A copy into the standard layout leaves nothing to ask.

Shape legend: B batch, H/W map, M heads, D head dim, R regions (rows*cols), T tokens per region
(region_h*region_w), K routed regions, P = B*R query regions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..regions import RegionGrid
from .inputs import RoutedAttentionInputs

name = "portable"


def _standard(x: Tensor) -> Tensor:
    """A copy in the standard (row-major) layout, also where x may already have it: see the module docstring."""
    return x.clone(memory_format=torch.contiguous_format)


def head_major_regions(x: Tensor, grid: RegionGrid) -> Tensor:
    """(B, H, W, M, D) -> (B, R, M, T, D), padding as needed."""
    batch, _, _, heads, dim = x.shape
    x = grid.pad(x).view(batch, grid.rows, grid.region_h, grid.cols, grid.region_w, heads, dim)
    x = _standard(x.permute(0, 1, 3, 5, 2, 4, 6))  # (B, rows, cols, M, region_h, region_w, D)
    return x.view(batch, grid.num_regions, heads, grid.tokens_per_region, dim)


def from_head_major_regions(x: Tensor, grid: RegionGrid) -> Tensor:
    """(B, R, M, T, D) -> (B, H, W, M, D), dropping the padding: the padded map, then its H x W tokens gathered.
    (A gather rather than a crop: a cropped map's layout asks whether it was padded.)"""
    batch, _, heads, _, dim = x.shape
    x = x.view(batch, grid.rows, grid.cols, heads, grid.region_h, grid.region_w, dim)
    x = _standard(x.permute(0, 1, 4, 2, 5, 3, 6))  # (B, rows, region_h, cols, region_w, M, D)
    x = x.view(batch, grid.padded_height * grid.padded_width, heads, dim)
    inside = torch.arange(grid.height, device=x.device)[:, None] * grid.padded_width \
        + torch.arange(grid.width, device=x.device)[None, :]  # (H, W): each token's place in the padded map
    return x.index_select(1, inside.flatten()).view(batch, grid.height, grid.width, heads, dim)


def attend(inputs: RoutedAttentionInputs, indices: Tensor) -> Tensor:
    q, k, v, grid, scale, masked = inputs.q, inputs.k, inputs.v, inputs.grid, inputs.scale, inputs.masked
    batch, num_regions, topk = indices.shape
    heads, tokens = q.shape[3], grid.tokens_per_region
    q_regions, k_regions, v_regions = (head_major_regions(t, grid) for t in (q, k, v))  # (B, R, M, T, D)
    batch_index = torch.arange(batch, device=q.device)[:, None, None]

    def routed(x: Tensor) -> Tensor:  # (B, R, M, T, D) -> (P, M, K*T, D): each query region's routed tokens
        x = _standard(x[batch_index, indices].transpose(2, 3))  # (B, R, M, K, T, D)
        return x.view(batch * num_regions, heads, topk * tokens, x.shape[-1])

    # matmuls and a softmax, not SDPA: SDPA's decomposition broadcasts the key mask over the T query rows
    # in a way that asks whether T is 1
    q_rows = q_regions.view(batch * num_regions, heads, tokens, q.shape[-1])  # (P, M, T, D)
    logits = (q_rows * scale) @ routed(k_regions).transpose(-1, -2)
    if masked and grid.is_padded:  # (P, M, T, K*T)
        key_valid = grid.valid_tokens(q.device)[indices].view(batch * num_regions, 1, 1, topk * tokens)
        logits = logits.masked_fill(~key_valid, float("-inf"))
    out = logits.softmax(-1) @ routed(v_regions)  # (P, M, T, Dv)
    return from_head_major_regions(out.view(batch, num_regions, heads, tokens, v.shape[-1]), grid)
