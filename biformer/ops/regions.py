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

from ..layers.exporting import known_zero, plain_eager


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
        # each slot's map row and column from region and token coordinates, broadcast: also exported, no re-layout
        # whose form depends on which (symbolic) sizes are 1, and no division (ONNX cannot take a symbolic divisor)
        arange = functools.partial(torch.arange, device=device)
        row = arange(self.rows)[:, None, None, None] * self.region_h + arange(self.region_h)[None, None, :, None]
        col = arange(self.cols)[None, :, None, None] * self.region_w + arange(self.region_w)[None, None, None, :]
        inside = (row < self.height) & (col < self.width)  # (rows, cols, region_h, region_w)
        return inside.view(self.num_regions, self.tokens_per_region)

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
    logits: (B, R, R) region-to-region affinity in at least float32 (-inf for key regions made only of padding).
    grid: the region geometry (regions are numbered row-major over grid.rows x grid.cols).
    """

    indices: Tensor
    logits: Tensor
    grid: RegionGrid

    @property
    def weights(self) -> Tensor:
        """(B, R, K) softmax of the routed region logits (the original's `r_weight`, which its attention never
        uses: computed when asked)."""
        return self.logits.gather(-1, self.indices).softmax(-1)


def _query_key_pair(q: Tensor, k: Tensor) -> Tensor:
    """(B, H, W, 2, M, D): q and k side by side. BRA's q and k are slices of one qkv tensor at a fixed distance:
    then a view (one reduction reads both), else a copy; a copy under an exporter too, which would bake a
    view's strides in, and under torch.compile, which fuses the copy away."""
    view = plain_eager() and q.layout == k.layout == torch.strided \
        and q.dtype == k.dtype and q.shape == k.shape and q.stride() == k.stride() \
        and torch._C._is_alias_of(q, k)  # the same storage (torch has no public name for it)
    distance = k.storage_offset() - q.storage_offset() if view else 0
    if distance > 0:
        return q.as_strided((*q.shape[:3], 2, *q.shape[3:]), (*q.stride()[:3], distance, *q.stride()[3:]))
    return torch.stack((q, k), dim=3)


def _region_sums(x: Tensor, grid: RegionGrid, dtype: torch.dtype) -> Tensor:
    """(B, H, W, S, M, D) -> (B, R, S, M*D) sums over each region's T slots, the padding counting as zeros: x read
    in its own dtype and summed in `dtype` over the map's region view (no copy where the map needs no padding)."""
    regions = grid.pad(x).view(x.shape[0], grid.rows, grid.region_h, grid.cols, grid.region_w, *x.shape[3:])
    if x.device.type == "cpu":  # ATen's CPU reduction is 4-10x faster one axis at a time (two launches elsewhere)
        sums = regions.sum(4, dtype=dtype).sum(2)
    else:
        sums = regions.sum((2, 4), dtype=dtype)
    return sums.flatten(1, 2).flatten(3)


def region_means(x: Tensor, grid: RegionGrid, masked: bool) -> tuple[Tensor, float]:
    """(B, H, W, S, M, D) -> (B, R, S, M*D) region sums or means in at least float32, and the factor that makes
    sums means.

    Means are over all T slots of a region, the padding counting as zeros: then one reduction gives the sums
    (`_region_sums`) and the division is left to the caller (sums, factor 1 / T). Masked on a padded map, they
    are over the map's tokens only, which are all that is read (means, factor 1; regions of padding only get
    zeros). Compiled or exported, always means, the sums divided in the graph (factor 1): a traced or symbolic
    region size must not become a constant factor (or a guard), and ONNX's AvgPool needs a fixed window.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    masks_padding = masked and grid.is_padded
    if not plain_eager():
        sums = _region_sums(x, grid, dtype)
        if masks_padding:  # over the counted tokens of the zero-padded map
            return sums / grid.valid_tokens(x.device).sum(-1).clamp(min=1).to(dtype)[:, None, None], 1.0
        return sums / grid.tokens_per_region, 1.0
    if not masks_padding:
        return _region_sums(x, grid, dtype), 1.0 / grid.tokens_per_region
    pair = x.shape[3]
    x = x.to(dtype).flatten(3)  # (B, H, W, S*C)
    # ceil_mode: a window cut by the map's bottom/right edge averages the tokens inside the map
    means = F.avg_pool2d(x.permute(0, 3, 1, 2), (grid.region_h, grid.region_w), ceil_mode=True)  # (B, S*C, r, c)
    if means.shape[-2:] != (grid.rows, grid.cols):  # no window starts beyond the map: regions of padding get zeros
        means = F.pad(means, (0, grid.cols - means.shape[-1], 0, grid.rows - means.shape[-2]))
    return means.flatten(2).transpose(1, 2).unflatten(-1, (pair, -1)), 1.0


def route(q: Tensor, k: Tensor, grid: RegionGrid, topk: int, scale: float, masked: bool) -> Routing:
    """Top-k key regions per query region from region means of q and k (all heads jointly).

    Runs on detached tensors, in float32 from the region sums on: routing is a discrete choice and passes no
    gradient. Three kernels where q and k are slices of one tensor and the map needs no padding: the region
    sums of both, the scaled affinity, top-k.
    """
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        means, factor = region_means(_query_key_pair(q.detach(), k.detach()), grid, masked)  # (B, R, 2, C)
        q_region, k_region = means.unbind(2)
        logits = torch.baddbmm(means.new_empty(()), q_region, k_region.transpose(-1, -2), beta=0,
                               alpha=scale * factor**2)  # (B, R, R); beta=0: the 0-d input is never read
        if masked and grid.is_padded:
            empty = ~grid.valid_tokens(q.device).any(-1)  # key regions made only of padding
            logits = logits.masked_fill(empty[None, None, :], float("-inf"))
        indices = torch.topk(logits, k=topk, dim=-1).indices
    return Routing(indices=indices, logits=logits, grid=grid)
