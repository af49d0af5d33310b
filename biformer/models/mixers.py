"""Hand-crafted sparse attentions, interchangeable with BRA in a BiFormer block (the paper's ablation).

Every mixer here is the same shell as `BiLevelRoutingAttention`: q, k, v = qkv(x), attention in a
fixed pattern, plus a depthwise conv over V ("lepe"), then proj; only which keys a query sees
differs. The state_dict keys (qkv, lepe, proj) are BRA's. Input and output are (B, H, W, C).

Patterns, on an H x W map (each query attends to the keys of its own group):
    window  Swin's local windows: s x s tiles; every other block shifts them by s // 2 (a cyclic
            shift with Swin's mask, so that tokens wrapped around the border do not meet).
    stripe  CSWin's axial stripes: half the heads (the first ceil(M / 2)) in horizontal stripes of
            w rows across the full width, the other half in vertical stripes of w columns.
    grid    MaxViT's grid (dilated) attention: the map cut into an s x s grid of cells; a group is
            the s x s tokens at the same place in every cell, spaced a cell apart.
    full    every token.
A side longer than the map is capped at the map's size. Maps that do not divide are zero-padded at
the bottom/right and padded keys are masked out, as BRA's "masked" padding does. The logit scale is
head_dim ** -0.5.

Shape legend: B batch, H/W map height/width (Hp/Wp padded), C channels, M heads, D head_dim,
G groups, L tokens per group.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.depthwise import DepthwiseConv2d
from ..layers.inplace import add_into
from ..layers.sdpa import scaled_dot_product_attention

__all__ = ["MIXERS", "FullAttention", "GridAttention", "PatternAttention", "StripeAttention", "WindowAttention"]


def _tile(x: Tensor, tile_h: int, tile_w: int, dilated: bool) -> Tensor:
    """(B, Hp, Wp, M, D) -> (B, G, M, L, D): contiguous tile_h x tile_w tiles, or (dilated) groups of
    tile_h x tile_w tokens spaced Hp // tile_h rows and Wp // tile_w columns apart."""
    batch, height, width, heads, dim = x.shape
    if dilated:  # y = a * cell_h + r: the group is (r, c), the member (a, b)
        x = x.view(batch, tile_h, height // tile_h, tile_w, width // tile_w, heads, dim).permute(0, 2, 4, 5, 1, 3, 6)
    else:  # y = r * tile_h + a
        x = x.view(batch, height // tile_h, tile_h, width // tile_w, tile_w, heads, dim).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(batch, -1, heads, tile_h * tile_w, dim)


def _untile(x: Tensor, height: int, width: int, tile_h: int, tile_w: int, dilated: bool) -> Tensor:
    """The inverse of `_tile`: (B, G, M, L, D) -> (B, Hp, Wp, M, D)."""
    batch, _, heads, _, dim = x.shape
    if dilated:
        x = x.view(batch, height // tile_h, width // tile_w, heads, tile_h, tile_w, dim).permute(0, 4, 1, 5, 2, 3, 6)
    else:
        x = x.view(batch, height // tile_h, width // tile_w, heads, tile_h, tile_w, dim).permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(batch, height, width, heads, dim)


def tiled_attention(
    q: Tensor, k: Tensor, v: Tensor, tile_h: int, tile_w: int, *, dilated: bool = False, shift: tuple[int, int] = (0, 0)
) -> Tensor:
    """Attention within groups of tokens: contiguous tiles, or dilated groups (see `_tile`).

    q, k, v: (B, H, W, M, D); tile_h/tile_w at most H/W. The map is zero-padded to whole tiles (for
    dilated groups: to whole cells) and padded keys are masked. shift (window tiles only): tiles
    shifted down/right by (sh, sw) tokens, as Swin rolls the map by (-sh, -sw) and masks the pairs
    that the roll brought together from opposite borders.
    """
    height, width = q.shape[1:3]
    cells_h, cells_w = math.ceil(height / tile_h), math.ceil(width / tile_w)
    padded_h, padded_w = cells_h * tile_h, cells_w * tile_w
    pad = (0, 0, 0, 0, 0, padded_w - width, 0, padded_h - height)
    q, k, v = (F.pad(t, pad) for t in (q, k, v))
    mask = None
    if padded_h != height or padded_w != width or any(shift):
        rows, cols = torch.arange(padded_h, device=q.device), torch.arange(padded_w, device=q.device)
        valid = (rows[:, None] < height) & (cols[None, :] < width)  # (Hp, Wp)
        if any(shift):  # where each token is once the map is rolled
            valid = torch.roll(valid, (-shift[0], -shift[1]), (0, 1))
        # Swin's segments of the rolled map: the last tile row/column holds two pieces once shifted
        label = (_segments(padded_h, tile_h, shift[0], q.device)[:, None] * 3
                 + _segments(padded_w, tile_w, shift[1], q.device)[None, :])
        valid_g, label_g = (_tile(t[None, :, :, None, None], tile_h, tile_w, dilated)[0, :, 0, :, 0] for t in (valid, label))
        mask = (label_g[:, :, None] == label_g[:, None, :]) & valid_g[:, None, :]  # (G, L, L)
        # a padding query may see no key at all; letting it see itself keeps its (discarded) row finite
        mask |= torch.eye(mask.shape[-1], dtype=torch.bool, device=q.device)
        mask = mask[:, None].repeat(q.shape[0], 1, 1, 1)  # (B*G, 1, L, L): one mask for all heads
    if any(shift):
        q, k, v = (torch.roll(t, (-shift[0], -shift[1]), (1, 2)) for t in (q, k, v))
    # 4-D (B*G, M, L, D): CPU SDPA has fused kernels for 4-D inputs only
    groups = [_tile(t, tile_h, tile_w, dilated).flatten(0, 1) for t in (q, k, v)]
    out = scaled_dot_product_attention(*groups, attn_mask=mask).unflatten(0, (q.shape[0], -1))
    out = _untile(out, padded_h, padded_w, tile_h, tile_w, dilated)
    if any(shift):
        out = torch.roll(out, shift, (1, 2))
    return out[:, :height, :width]


def _segments(size: int, tile: int, shift: int, device: torch.device) -> Tensor:
    """Swin's labels along one rolled axis: 0 before the last tile, then 1 and 2 for the pieces that
    came from the far end and from the start of the map."""
    index = torch.arange(size, device=device)
    if not shift:
        return torch.zeros_like(index)
    return (index >= size - tile).long() + (index >= size - shift).long()


class PatternAttention(nn.Module):
    """The shell every mixer shares: proj(attend(q, k, v) + lepe(v)), q, k, v = qkv(x); (B, H, W, C) in and out."""

    def __init__(self, dim: int, num_heads: int, side_dwconv: int = 5, qkv_bias: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must be positive and divide dim={dim}")
        self.dim, self.num_heads = dim, num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = DepthwiseConv2d(dim, side_dwconv) if side_dwconv else None
        self.proj = nn.Linear(dim, dim)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(B, H, W, M, D) each -> (B, H, W, M, D): the mixer's attention pattern."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"expected a (B, H, W, C) input with C={self.dim} channels, got shape {tuple(x.shape)}")
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(3)
        out = self.attend(q, k, v).flatten(3)
        if self.lepe is not None:
            out = add_into(self.lepe(v.flatten(3).permute(0, 3, 1, 2)).permute(0, 2, 3, 1), out)
        return self.proj(out)


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class WindowAttention(PatternAttention):
    """Swin: attention within window_size x window_size windows, shifted by half a window if `shifted`."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shifted: bool = False, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.window_size, self.shifted = _positive("window_size", window_size), shifted

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, shifted={self.shifted}"

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        height, width = q.shape[1:3]
        tile_h, tile_w = min(self.window_size, height), min(self.window_size, width)
        # as in Swin, a side no longer than the window is one window and is not shifted
        shift = tuple(tile // 2 if self.shifted and size > self.window_size else 0
                      for tile, size in ((tile_h, height), (tile_w, width)))
        return tiled_attention(q, k, v, tile_h, tile_w, shift=shift)


class StripeAttention(PatternAttention):
    """CSWin: the first ceil(M / 2) heads in horizontal stripes of stripe_width rows, the rest in vertical ones."""

    def __init__(self, dim: int, num_heads: int, stripe_width: int = 1, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.stripe_width = _positive("stripe_width", stripe_width)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, stripe_width={self.stripe_width}"

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        height, width = q.shape[1:3]
        split = (self.num_heads + 1) // 2
        rows = tiled_attention(q[..., :split, :], k[..., :split, :], v[..., :split, :],
                               min(self.stripe_width, height), width)
        if split == self.num_heads:
            return rows
        columns = tiled_attention(q[..., split:, :], k[..., split:, :], v[..., split:, :],
                                  height, min(self.stripe_width, width))
        return torch.cat((rows, columns), dim=3)


class GridAttention(PatternAttention):
    """MaxViT: attention among the grid_size x grid_size tokens at one place of each cell of a grid_size x grid_size grid."""

    def __init__(self, dim: int, num_heads: int, grid_size: int = 7, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.grid_size = _positive("grid_size", grid_size)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, grid_size={self.grid_size}"

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        height, width = q.shape[1:3]
        return tiled_attention(q, k, v, min(self.grid_size, height), min(self.grid_size, width), dilated=True)


class FullAttention(PatternAttention):
    """Every query attends to every key of the map."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        height, width = q.shape[1:3]
        out = scaled_dot_product_attention(*(t.flatten(1, 2).transpose(1, 2) for t in (q, k, v)))  # (B, M, HW, D)
        return out.transpose(1, 2).unflatten(1, (height, width))


# the `attention=` names a BiFormer accepts besides "bra"
MIXERS = {"window": WindowAttention, "stripe": StripeAttention, "grid": GridAttention, "full": FullAttention}
