"""Dense backend: attention over the whole map with a boolean region-block mask from the routing.

Every query attends to every token of the map, and the routing becomes a (B, N, N) mask whose
(i, j) entry says whether the region of token j is among those routed for the region of token i.
The result is identical to gathering the routed regions (masked logits get zero probability), and
on small maps, where a query routes to a large share of the regions (BiFormer's 14x14 stage routes
to 16 of 49), one fused SDPA call is faster than skipping the unrouted work.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..regions import RegionGrid

name = "dense"

# Auto-dispatch takes this backend on maps of at most SMALL_MAP tokens, or where the whole map is
# at most MAX_DENSE_WORK_RATIO times the keys each query routes to (measured on CPU: at 3x the
# dense call wins, at 12x it loses 3-5x), and where its (B, N, N) boolean mask stays small.
SMALL_MAP = 64
MAX_DENSE_WORK_RATIO = 4
MAX_MASK_BYTES = 64 << 20


def is_available() -> bool:
    return True


def not_supported_reasons(q: Tensor, k: Tensor, v: Tensor, grid: RegionGrid, topk: int, masked: bool) -> list[str]:
    return []


def is_fast_for(q: Tensor, k: Tensor, v: Tensor, grid: RegionGrid, topk: int, masked: bool) -> bool:
    tokens = grid.padded_height * grid.padded_width
    return (
        tokens <= max(SMALL_MAP, MAX_DENSE_WORK_RATIO * topk * grid.tokens_per_region)
        and q.shape[0] * tokens * tokens <= MAX_MASK_BYTES
    )


def region_block_mask(indices: Tensor, grid: RegionGrid, masked: bool) -> Tensor:
    """(B, N, N) bool over the padded map's tokens (row-major): may token i attend to token j."""
    batch, num_regions, _ = indices.shape
    device = indices.device
    routed = torch.zeros(batch, num_regions, num_regions, dtype=torch.bool, device=device)
    routed.scatter_(2, indices, True)  # routed[b, query region, key region]
    rows = torch.arange(grid.padded_height, device=device) // grid.region_h
    cols = torch.arange(grid.padded_width, device=device) // grid.region_w
    token_region = (rows[:, None] * grid.cols + cols[None, :]).flatten()  # (N,)
    allowed = routed.index_select(1, token_region).index_select(2, token_region)
    if masked and grid.is_padded:
        inside = torch.zeros(grid.padded_height, grid.padded_width, dtype=torch.bool, device=device)
        inside[: grid.height, : grid.width] = True
        allowed &= inside.flatten()
    return allowed


def attend(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, grid: RegionGrid, scale: float, masked: bool) -> Tensor:
    # (B, H', W', M, D) padded map -> (B, M, N, D)
    q_map, k_map, v_map = (rearrange(grid.pad(t), "b h w m d -> b m (h w) d") for t in (q, k, v))
    mask = region_block_mask(indices, grid, masked)[:, None]  # (B, 1, N, N), shared by the heads
    out = F.scaled_dot_product_attention(q_map, k_map, v_map, attn_mask=mask, scale=scale)
    out = rearrange(out, "b m (h w) d -> b h w m d", h=grid.padded_height)
    return out[:, : grid.height, : grid.width]
