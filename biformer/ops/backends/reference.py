"""Reference backend: gather the routed regions' tokens, then dense attention per query region.

The original release's gather (each routed region is copied K times), written plainly: advanced
indexing, then one SDPA call per query region (4-D, so the ONNX exporter takes it). It is the
specification the other backends are tested against, and it runs on every device and dtype;
`original` keeps the release's own expand/gather/matmul form as the benchmark baseline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .inputs import RoutedAttentionInputs
from .spec import Backend


def attend(inputs: RoutedAttentionInputs, indices: Tensor) -> Tensor:
    q, k, v, grid, scale, masked = inputs.q, inputs.k, inputs.v, inputs.grid, inputs.scale, inputs.masked
    batch, num_regions, topk = indices.shape
    q_regions = grid.to_regions(q)  # (B, R, T, M, D), from (B, *S, M, D)
    k_regions = grid.to_regions(k)
    v_regions = grid.to_regions(v)
    batch_index = torch.arange(batch, device=q.device)[:, None, None]
    k_routed = k_regions[batch_index, indices]  # (B, R, K, T, M, D)
    v_routed = v_regions[batch_index, indices]
    # SDPA with 4-D inputs: one attention problem per (batch, query region).
    q_4d = rearrange(q_regions, "b r t m d -> (b r) m t d")
    k_4d = rearrange(k_routed, "b r k t m d -> (b r) m (k t) d")
    v_4d = rearrange(v_routed, "b r k t m d -> (b r) m (k t) d")
    key_mask = None
    if masked and grid.is_padded:
        valid = grid.valid_tokens(q.device)[indices]  # (B, R, K, T)
        key_mask = rearrange(valid, "b r k t -> (b r) 1 1 (k t)")
    out = F.scaled_dot_product_attention(q_4d, k_4d, v_4d, attn_mask=key_mask, scale=scale)
    out = rearrange(out, "(b r) m t d -> b r t m d", b=batch)
    return grid.from_regions(out)


# the fallback of automatic dispatch on every device: it runs every input
BACKEND = Backend("reference", attend, auto_devices=None, traces=True, spatial_axes=(1, 2, 3))
