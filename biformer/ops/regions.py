"""Region grid geometry and region-to-region routing, shared by every backend.

Shape legend: B batch, H/W map height/width, M heads, D head dim, C = M*D channels,
R regions (rows*cols), T tokens per region (region_h*region_w), K routed regions (topk).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

PADDING_MODES = ("masked", "legacy")

# Test hook: when set, padding is filled with noise of this magnitude instead of zeros, to prove
# that masked mode never reads it. Only ever set through `_fill_padding_with_noise`.
_padding_noise: float | None = None


@contextlib.contextmanager
def _fill_padding_with_noise(magnitude: float) -> Iterator[None]:
    global _padding_noise
    previous, _padding_noise = _padding_noise, magnitude
    try:
        yield
    finally:
        _padding_noise = previous


@dataclass(frozen=True)
class RegionGrid:
    """An H x W map cut into rows x cols regions of region_h x region_w tokens.

    region_h = ceil(H / rows), region_w = ceil(W / cols); the map is padded at the bottom/right
    to rows*region_h x cols*region_w, so some regions may hold padding (or only padding).
    """

    height: int
    width: int
    rows: int
    cols: int

    @property
    def region_h(self) -> int:
        return math.ceil(self.height / self.rows)

    @property
    def region_w(self) -> int:
        return math.ceil(self.width / self.cols)

    @property
    def padded_height(self) -> int:
        return self.rows * self.region_h

    @property
    def padded_width(self) -> int:
        return self.cols * self.region_w

    @property
    def num_regions(self) -> int:
        return self.rows * self.cols

    @property
    def tokens_per_region(self) -> int:
        return self.region_h * self.region_w

    @property
    def is_padded(self) -> bool:
        return self.padded_height != self.height or self.padded_width != self.width

    def valid_tokens(self, device: torch.device | str | None = None) -> Tensor:
        """(R, T) bool: which token slots of each region lie inside the unpadded map."""
        rows = torch.arange(self.padded_height, device=device) < self.height
        cols = torch.arange(self.padded_width, device=device) < self.width
        valid = rows[:, None] & cols[None, :]
        return rearrange(valid, "(r h) (c w) -> (r c) (h w)", h=self.region_h, w=self.region_w)

    def pad(self, x: Tensor) -> Tensor:
        """(B, H, W, ...) -> (B, padded_H, padded_W, ...), zeros (or the test noise) in the padding."""
        pad_bottom, pad_right = self.padded_height - self.height, self.padded_width - self.width
        if not (pad_bottom or pad_right):
            return x
        trailing = [0, 0] * (x.dim() - 3)
        padded = F.pad(x, trailing + [0, pad_right, 0, pad_bottom])
        if _padding_noise is not None:
            inside = torch.zeros_like(padded, dtype=torch.bool)
            inside[:, : self.height, : self.width] = True
            noise = torch.randn_like(padded) * _padding_noise
            padded = torch.where(inside, padded, noise)
        return padded

    def to_regions(self, x: Tensor) -> Tensor:
        """(B, H, W, *rest) -> (B, R, T, *rest), padding as needed."""
        return rearrange(
            self.pad(x), "b (r h) (c w) ... -> b (r c) (h w) ...", h=self.region_h, w=self.region_w
        )

    def from_regions(self, x: Tensor) -> Tensor:
        """(B, R, T, *rest) -> (B, H, W, *rest), dropping the padding."""
        x = rearrange(
            x, "b (r c) (h w) ... -> b (r h) (c w) ...", r=self.rows, h=self.region_h, w=self.region_w
        )
        return x[:, : self.height, : self.width]


class Routing(NamedTuple):
    """What routing decided, for inspection and visualisation.

    indices: (B, R, K) int64, the key regions each query region attends to, best first.
    weights: (B, R, K) softmax of the routed region logits (the original's unused `r_weight`).
    logits: (B, R, R) region-to-region affinity (-inf for key regions made only of padding).
    grid: the region geometry (regions are numbered row-major over grid.rows x grid.cols).
    """

    indices: Tensor
    weights: Tensor
    logits: Tensor
    grid: RegionGrid


def region_means(x: Tensor, grid: RegionGrid, masked: bool) -> Tensor:
    """(B, H, W, M, D) -> (B, R, M*D) means over each region's tokens, in at least float32.

    masked: over the valid tokens only; legacy: over all region_h*region_w slots, padding as zeros.
    """
    x = x.flatten(3).to(torch.promote_types(x.dtype, torch.float32))  # (B, H, W, C)
    if masked and grid.is_padded:  # zeros (never the test noise) in the padding, so that they add nothing to the sums
        padded = F.pad(x, (0, 0, 0, grid.padded_width - grid.width, 0, grid.padded_height - grid.height))
    else:
        padded = grid.pad(x)  # x itself where the map needs no padding
    # pooling the channels-last map reads each token once, without copying the map into region order
    means = F.avg_pool2d(padded.permute(0, 3, 1, 2), (grid.region_h, grid.region_w)).flatten(2).transpose(1, 2)
    if masked and grid.is_padded:  # the pool divided by T; divide by the valid tokens instead
        count = grid.valid_tokens(x.device).sum(-1).clamp(min=1)
        means = means * (grid.tokens_per_region / count[None, :, None].to(means.dtype))
    return means


def route(q: Tensor, k: Tensor, grid: RegionGrid, topk: int, scale: float, masked: bool) -> Routing:
    """Top-k key regions per query region from region means of q and k (all heads jointly).

    Runs on detached tensors in at least float32: routing is a discrete choice and passes no gradient.
    """
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        q_region = region_means(q.detach(), grid, masked)
        k_region = region_means(k.detach(), grid, masked)
        logits = (q_region * scale) @ k_region.transpose(-1, -2)  # (B, R, R)
        if masked and grid.is_padded:
            empty = ~grid.valid_tokens(q.device).any(-1)  # key regions made only of padding
            logits = logits.masked_fill(empty[None, None, :], float("-inf"))
        top_logits, indices = torch.topk(logits, k=topk, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)
    return Routing(indices=indices, weights=weights, logits=logits, grid=grid)
