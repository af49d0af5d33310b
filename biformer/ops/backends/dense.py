"""Dense backend: attention over the whole map with a region-block logit bias from the routing.

Every query attends to every token of the map, and the routing becomes a (B, N, N) logit bias that
is -inf unless the region of token j is among those routed for the region of token i.
The result is identical to gathering the routed regions (masked logits get zero probability), and
on small maps, where a query routes to a large share of the regions (BiFormer's 14x14 stage routes
to 16 of 49), one fused SDPA call is faster than skipping the unrouted work.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from ...layers.sdpa import scaled_dot_product_attention
from ..regions import RegionGrid
from .inputs import RoutedAttentionInputs
from .spec import Backend

# Auto-dispatch takes this backend on maps of at most SMALL_MAP tokens, or where the whole map is
# at most MAX_DENSE_WORK_RATIO times the keys each query routes to (measured on CPU: at 3x the
# dense call wins, at 12x it loses 3-5x) and has at most MAX_DENSE_TOKENS tokens (at 3x, a 14x14
# map ran 2.4x faster dense, 32x32 and 38x32 maps 1.2-1.4x slower), and where its (B, N, N) logit
# bias, which SDPA keeps for the backward, stays small.
SMALL_MAP = 64
MAX_DENSE_WORK_RATIO = 4
MAX_DENSE_TOKENS = 512
MAX_BIAS_BYTES = 256 << 20


def _is_fast_for(inputs: RoutedAttentionInputs) -> bool:
    q, grid, topk = inputs.q, inputs.grid, inputs.topk
    tokens = grid.padded_height * grid.padded_width
    return (
        tokens <= max(SMALL_MAP, min(MAX_DENSE_WORK_RATIO * topk * grid.tokens_per_region, MAX_DENSE_TOKENS))
        and q.shape[0] * tokens * tokens * q.element_size() <= MAX_BIAS_BYTES
    )


def region_block_bias(indices: Tensor, grid: RegionGrid, masked: bool, dtype: torch.dtype) -> Tensor:
    """(B, N, N) logit bias over the padded map's tokens (row-major): 0 where token i may attend to
    token j (j's region is routed for i's region and, if masked, j is not padding), else -inf.

    A row-major token index runs over (region row, row in region, region column, column in region),
    so the bias is the (B, R, R) routing table broadcast over those axes: one copy, no gather.
    """
    batch, num_regions, _ = indices.shape
    rows, cols, region_h, region_w = grid.rows, grid.cols, grid.region_h, grid.region_w
    tokens = grid.padded_height * grid.padded_width
    blocked = torch.full((batch, num_regions, num_regions), float("-inf"), dtype=dtype, device=indices.device)
    blocked.scatter_(2, indices, 0.0)  # blocked[b, query region, key region] = 0 where routed
    bias = blocked.view(batch, rows, 1, cols, 1, rows, 1, cols, 1)
    bias = bias.expand(batch, rows, region_h, cols, region_w, rows, region_h, cols, region_w)
    bias = bias.reshape(batch, tokens, tokens)
    if masked and grid.is_padded:
        inside = torch.zeros(grid.padded_height, grid.padded_width, dtype=torch.bool, device=indices.device)
        inside[: grid.height, : grid.width] = True
        bias = bias.masked_fill(~inside.flatten(), float("-inf"))  # keys in the padding
    return bias


def attend(inputs: RoutedAttentionInputs, indices: Tensor) -> Tensor:
    q, k, v, grid, scale, masked = inputs.q, inputs.k, inputs.v, inputs.grid, inputs.scale, inputs.masked
    # (B, H', W', M, D) padded map -> (B, M, N, D) views: SDPA reads the strided heads in place
    q_map, k_map, v_map = (rearrange(grid.pad(t), "b h w m d -> b m (h w) d") for t in (q, k, v))
    bias = region_block_bias(indices, grid, masked, q.dtype)[:, None]  # (B, 1, N, N), shared by the heads
    out = scaled_dot_product_attention(q_map, k_map, v_map, attn_mask=bias, scale=scale)
    out = rearrange(out, "b m (h w) d -> b h w m d", h=grid.padded_height)
    return grid.crop(out)


# measured on CPUs only: on CUDA, dispatch takes the reference where the Triton kernels step aside
BACKEND = Backend("dense", attend, auto_devices=("cpu",), traces=True, is_fast_for=_is_fast_for)
