"""Original backend: the original release's algorithm, kept as the baseline that benchmarks beat.

The original gathers the routed regions with `torch.gather` from a key/value tensor expanded to
one copy per query region, so its backward scatters into a (B, R, R, T, C) buffer, and it runs
attention as explicit matmul, softmax and matmul over the (B, R, M, T, K*T) logits. Same result
as the reference; never picked automatically (the reference comes first and always runs).

Shape legend: B batch, R regions, T tokens per region, K topk, M heads, D/Dv head dims.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from .inputs import RoutedAttentionInputs
from .spec import Backend


def attend(inputs: RoutedAttentionInputs, indices: Tensor) -> Tensor:
    q, k, v, grid, scale, masked = inputs.q, inputs.k, inputs.v, inputs.grid, inputs.scale, inputs.masked
    batch, num_regions, topk = indices.shape
    heads, qk_dim = q.shape[3:]
    q_regions = rearrange(grid.to_regions(q), "b r t m d -> b r m t d")
    kv = torch.cat([grid.to_regions(k).flatten(3), grid.to_regions(v).flatten(3)], dim=-1)  # (B, R, T, C)
    tokens, channels = kv.shape[2:]
    kv_routed = torch.gather(  # (B, R, K, T, C): every routed region copied for each query region
        kv[:, None].expand(-1, num_regions, -1, -1, -1),
        dim=2,
        index=indices[..., None, None].expand(-1, -1, -1, tokens, channels),
    )
    k_routed, v_routed = kv_routed.split([heads * qk_dim, channels - heads * qk_dim], dim=-1)
    k_routed = rearrange(k_routed, "b r k t (m d) -> b r m d (k t)", m=heads)
    v_routed = rearrange(v_routed, "b r k t (m d) -> b r m (k t) d", m=heads)
    logits = (q_regions * scale) @ k_routed  # (B, R, M, T, K*T)
    if masked and grid.is_padded:
        valid = rearrange(grid.valid_tokens(q.device)[indices], "b r k t -> b r 1 1 (k t)")
        logits = logits.masked_fill(~valid, float("-inf"))
    out = torch.softmax(logits, dim=-1) @ v_routed  # (B, R, M, T, Dv)
    return grid.from_regions(rearrange(out, "b r m t d -> b r t m d"))


BACKEND = Backend("original", attend, traces=True)  # a benchmark baseline: never dispatched automatically
