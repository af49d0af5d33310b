"""Scaled dot-product attention that avoids ATen's slow half-precision CPU backward."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .inplace import autograd_records

HALF_DTYPES = (torch.float16, torch.bfloat16)


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """`F.scaled_dot_product_attention`, computed in float32 on CPU where half inputs need gradients.

    ATen's CPU flash-attention backward in bfloat16/float16 is several times slower than in
    float32 (measured at BiFormer's shapes, 2 threads: stage 4, (8, 16, 49, 32), 13.1 vs 2.1 ms
    forward+backward with the casts; stage 3 with its block bias, (8, 8, 196, 32), 17.5 vs 10.3 ms),
    while its half forward is the faster one, so only training takes the float32 detour. The result
    is cast back to the inputs' dtype; autocast is off inside so it cannot cast them down again.
    """
    if q.device.type == "cpu" and q.dtype in HALF_DTYPES and autograd_records(q, k, v):
        with torch.autocast("cpu", enabled=False):
            mask = attn_mask.float() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
