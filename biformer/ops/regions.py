"""Region grid geometry, padding modes and region-to-region routing, shared by every backend.

Shape legend: B batch, H/W map height/width, M heads, D head dim, C = M*D channels,
R regions (rows*cols), T tokens per region (region_h*region_w), K routed regions (topk).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..layers.exporting import is_exporting, known_zero


@dataclass(frozen=True)
class Padding:
    """How a padding mode cuts the map into regions and treats the padded tokens.

    The map is always padded with zeros at the bottom/right to whole regions.
    floor_regions: regions of floor(H / n_win) x floor(W / n_win) tokens, as many as cover the map
        (so possibly more than n_win per side); else n_win per side of ceil(H / n_win) x ceil(W / n_win).
    mask_routing: region means are over the map's tokens only (and key regions of padding only are
        never routed); else the padded zeros count in the means.
    mask_attention: attention skips padded keys; else it attends to them as zeros.
    """

    floor_regions: bool
    mask_routing: bool
    mask_attention: bool


PADDING_MODES: dict[str, Padding] = {
    # padded tokens take no part in routing or attention: the outputs never depend on them
    "masked": Padding(floor_regions=False, mask_routing=True, mask_attention=True),
    # the original legacy layer with auto_pad=True: padded zeros count in the means and are attended to
    "legacy": Padding(floor_regions=False, mask_routing=False, mask_attention=False),
    # the original NCHW layer: floor-sized regions, means over the map's tokens, padded zeros attended to
    "legacy_nchw": Padding(floor_regions=True, mask_routing=True, mask_attention=False),
}


def padding_mode(name: str) -> Padding:
    """The rules of padding mode `name`; ValueError naming the modes if there is no such mode."""
    if name not in PADDING_MODES:
        raise ValueError(f"padding must be one of {tuple(PADDING_MODES)}, got {name!r}")
    return PADDING_MODES[name]


@dataclass(frozen=True)
class RegionGrid:
    """An H x W map cut into rows x cols regions of region_h x region_w tokens.

    The map is padded at the bottom/right to rows*region_h x cols*region_w, so some regions may
    hold padding (or, with ceil-sized regions, only padding). `region_grid` builds it per padding mode.
    """

    height: int
    width: int
    rows: int
    cols: int
    region_h: int
    region_w: int

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
        """Whether the map needs padding; True for symbolic sizes that may need it (an exported graph pads)."""
        return not (known_zero(self.padded_height - self.height) and known_zero(self.padded_width - self.width))

    def valid_tokens(self, device: torch.device | str | None = None) -> Tensor:
        """(R, T) bool: which token slots of each region lie inside the unpadded map."""
        if is_exporting():
            # each slot's map row and column from region and token coordinates, broadcast: no re-layout whose
            # form depends on which (symbolic) sizes are 1, and no division (ONNX cannot take a symbolic divisor)
            arange = functools.partial(torch.arange, device=device)
            row = arange(self.rows)[:, None, None, None] * self.region_h + arange(self.region_h)[None, None, :, None]
            col = arange(self.cols)[None, :, None, None] * self.region_w + arange(self.region_w)[None, None, None, :]
            inside = (row < self.height) & (col < self.width)  # (rows, cols, region_h, region_w)
            return inside.view(self.num_regions, self.tokens_per_region)
        rows = torch.arange(self.padded_height, device=device) < self.height
        cols = torch.arange(self.padded_width, device=device) < self.width
        valid = rows[:, None] & cols[None, :]
        return rearrange(valid, "(r h) (c w) -> (r c) (h w)", h=self.region_h, w=self.region_w)

    def pad(self, x: Tensor) -> Tensor:
        """(B, H, W, ...) -> (B, padded_H, padded_W, ...), zeros in the padding."""
        pad_bottom, pad_right = self.padded_height - self.height, self.padded_width - self.width
        if known_zero(pad_bottom) and known_zero(pad_right):
            return x
        trailing = [0, 0] * (x.dim() - 3)
        return F.pad(x, trailing + [0, pad_right, 0, pad_bottom])

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
        return self.crop(x)

    def crop(self, x: Tensor) -> Tensor:
        """(B, padded_H, padded_W, ...) -> (B, H, W, ...). narrow, not a slice: an exported graph knows the
        result's size as H itself, where a slice's is min(padded_H, H), which no later size check can match."""
        return x.narrow(1, 0, self.height).narrow(2, 0, self.width)


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

    masked: over the map's tokens only, never reading the padding (regions of padding only get
    zeros); else over all region_h*region_w slots, the padding counting as zeros.
    """
    x = x.flatten(3).to(torch.promote_types(x.dtype, torch.float32))  # (B, H, W, C)
    if is_exporting():
        return _region_means_by_sums(x, grid, masked)
    if not masked:
        x = grid.pad(x)  # x itself where the map needs no padding
    # pooling the channels-last map reads each token once, without copying the map into region order;
    # ceil_mode: a window cut by the map's bottom/right edge averages the tokens inside the map
    means = F.avg_pool2d(x.permute(0, 3, 1, 2), (grid.region_h, grid.region_w), ceil_mode=True)  # (B, C, r, c)
    if means.shape[-2:] != (grid.rows, grid.cols):  # no window starts beyond the map: regions of padding get zeros
        means = F.pad(means, (0, grid.cols - means.shape[-1], 0, grid.rows - means.shape[-2]))
    return means.flatten(2).transpose(1, 2)


def _region_means_by_sums(x: Tensor, grid: RegionGrid, masked: bool) -> Tensor:
    """region_means of a (B, H, W, C) map as sums over its region-major view, divided by the tokens counted:
    in an exported graph the region size follows the input's, and ONNX's AvgPool needs a fixed window."""
    batch, channels = x.shape[0], x.shape[-1]
    sums = grid.pad(x).view(batch, grid.rows, grid.region_h, grid.cols, grid.region_w, channels).sum((2, 4))
    counted = grid.valid_tokens(x.device) if masked else torch.ones_like(grid.valid_tokens(x.device))  # (R, T)
    return sums.flatten(1, 2) / counted.sum(-1).clamp(min=1).to(x.dtype)[:, None]


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
