"""Region grid geometry, padding modes and region-to-region routing, shared by every backend.

Shape legend: B batch, S... the map's spatial axes (L; H, W; or T, H, W), M heads, D head dim, C = M*D channels,
R regions (the product of the regions per axis), T tokens per region, K routed regions (topk).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.exporting import is_exporting, known_zero, plain_eager
from ..layers.layout import channels_first


@dataclass(frozen=True)
class Padding:
    """How a padding mode cuts the map into regions and treats the padded tokens.

    The map is always padded with zeros at the end of each axis (an image's bottom/right) to whole regions.
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
    """A map of 1, 2 or 3 spatial axes (a sequence, an image, a volume or clip) cut into regions: `counts[a]`
    regions of `sizes[a]` tokens along axis a.

    The map is padded at the end of each axis to counts[a] * sizes[a], so some regions may hold padding (or, with
    ceil-sized regions, only padding). Regions and the tokens in a region are numbered row-major (the last axis
    fastest). `region_grid` builds it per padding mode. The 2-D names (height, width, rows, cols, region_h,
    region_w) are for the backends that take 2-D maps only.
    """

    shape: tuple[int, ...]  # the map's size per spatial axis
    counts: tuple[int, ...]  # regions per axis
    sizes: tuple[int, ...]  # tokens per region per axis

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def padded_shape(self) -> tuple[int, ...]:
        return tuple(count * size for count, size in zip(self.counts, self.sizes))

    @property
    def split_shape(self) -> tuple[int, ...]:
        """The padded map's axes split into (regions, tokens) pairs: (c0, s0, c1, s1, ...)."""
        return tuple(extent for pair in zip(self.counts, self.sizes) for extent in pair)

    @property
    def num_regions(self) -> int:
        return math.prod(self.counts)

    @property
    def tokens_per_region(self) -> int:
        return math.prod(self.sizes)

    @property
    def is_padded(self) -> bool:
        """Whether the map needs padding; True for symbolic sizes that may need it (an exported graph pads)."""
        return not all(known_zero(padded - size) for padded, size in zip(self.padded_shape, self.shape))

    def _planar(self, values: tuple[int, ...]) -> tuple[int, int]:
        if self.ndim != 2:
            raise ValueError(f"this backend takes 2-D maps; the grid has {self.ndim} spatial axes")
        return values[0], values[1]

    height = property(lambda self: self._planar(self.shape)[0])
    width = property(lambda self: self._planar(self.shape)[1])
    rows = property(lambda self: self._planar(self.counts)[0])
    cols = property(lambda self: self._planar(self.counts)[1])
    region_h = property(lambda self: self._planar(self.sizes)[0])
    region_w = property(lambda self: self._planar(self.sizes)[1])
    padded_height = property(lambda self: self._planar(self.padded_shape)[0])
    padded_width = property(lambda self: self._planar(self.padded_shape)[1])

    def _slot_coordinates(self, device: torch.device | str | None) -> list[Tensor]:
        """Per axis a, each (region, token) slot's coordinate along a in the padded map, shaped to broadcast to
        (*counts, *sizes)."""
        arange = functools.partial(torch.arange, device=device)
        n, coordinates = self.ndim, []
        for axis, (count, size) in enumerate(zip(self.counts, self.sizes)):
            region_shape, token_shape = [1] * (2 * n), [1] * (2 * n)
            region_shape[axis], token_shape[n + axis] = -1, -1
            coordinates.append(arange(count).view(region_shape) * size + arange(size).view(token_shape))
        return coordinates

    def valid_tokens(self, device: torch.device | str | None = None) -> Tensor:
        """(R, T) bool: which token slots of each region lie inside the unpadded map."""
        # each slot's coordinates from region and token indices, broadcast: also exported, no re-layout whose form
        # depends on which (symbolic) sizes are 1, and no division (ONNX cannot take a symbolic divisor)
        inside = functools.reduce(torch.logical_and, [coordinate < size for coordinate, size
                                                      in zip(self._slot_coordinates(device), self.shape)])
        return inside.view(self.num_regions, self.tokens_per_region)

    def slot_offsets(self, device: torch.device | str | None = None) -> Tensor:
        """(R, T) int64: each (region, token) slot's row-major index in the padded map."""
        index = torch.zeros((), dtype=torch.int64, device=device)
        for coordinate, extent in zip(self._slot_coordinates(device), self.padded_shape):
            index = index * extent + coordinate
        return index.view(self.num_regions, self.tokens_per_region)

    def pad(self, x: Tensor) -> Tensor:
        """(B, *shape, ...) -> (B, *padded_shape, ...), zeros in the padding at the end of each axis."""
        missing = [padded - size for padded, size in zip(self.padded_shape, self.shape)]
        if all(known_zero(amount) for amount in missing):
            return x
        trailing = [0, 0] * (x.dim() - 1 - self.ndim)
        return F.pad(x, trailing + [value for amount in reversed(missing) for value in (0, amount)])

    def to_regions(self, x: Tensor) -> Tensor:
        """(B, *shape, *rest) -> (B, R, T, *rest), padding as needed."""
        n, rest = self.ndim, x.shape[1 + self.ndim:]
        x = self.pad(x).reshape(x.shape[0], *self.split_shape, *rest)  # (B, c0, s0, c1, s1, ..., *rest)
        order = [0, *(1 + 2 * a for a in range(n)), *(2 + 2 * a for a in range(n)), *range(1 + 2 * n, x.dim())]
        return x.permute(order).reshape(x.shape[0], self.num_regions, self.tokens_per_region, *rest)

    def from_regions(self, x: Tensor) -> Tensor:
        """(B, R, T, *rest) -> (B, *shape, *rest), dropping the padding."""
        n, rest = self.ndim, x.shape[3:]
        x = x.reshape(x.shape[0], *self.counts, *self.sizes, *rest)  # (B, c0, .., c{n-1}, s0, .., s{n-1}, *rest)
        order = [0, *(index for a in range(n) for index in (1 + a, 1 + n + a)), *range(1 + 2 * n, x.dim())]
        return self.crop(x.permute(order).reshape(x.shape[0], *self.padded_shape, *rest))

    def crop(self, x: Tensor) -> Tensor:
        """(B, *padded_shape, ...) -> (B, *shape, ...). narrow, not a slice: an exported graph knows the result's
        size as the map's itself, where a slice's is min(padded, size), which no later size check can match."""
        for axis, size in enumerate(self.shape):
            x = x.narrow(1 + axis, 0, size)
        return x


class Routing(NamedTuple):
    """What routing decided, for inspection and visualisation.

    indices: (B, R, K) int64, the key regions each query region attends to, best first.
    logits: (B, R, R) region-to-region affinity in at least float32 (-inf for key regions made only of padding).
    grid: the region geometry (regions are numbered row-major over grid.counts).
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
    """(B, *S, 2, M, D): q and k side by side. BRA's q and k are slices of one qkv tensor at a fixed distance:
    then a view (one reduction reads both), else a copy; a copy under an exporter too, which would bake a
    view's strides in, and under torch.compile, which fuses the copy away."""
    view = plain_eager() and q.layout == k.layout == torch.strided \
        and q.dtype == k.dtype and q.shape == k.shape and q.stride() == k.stride() \
        and torch._C._is_alias_of(q, k)  # the same storage (torch has no public name for it)
    distance = k.storage_offset() - q.storage_offset() if view else 0
    if distance > 0:
        return q.as_strided((*q.shape[:-2], 2, *q.shape[-2:]), (*q.stride()[:-2], distance, *q.stride()[-2:]))
    return torch.stack((q, k), dim=q.dim() - 2)


def _region_sums(x: Tensor, grid: RegionGrid, dtype: torch.dtype) -> Tensor:
    """(B, *S, P, M, D) -> (B, R, P, M*D) sums over each region's T slots, the padding counting as zeros: x read
    in its own dtype and summed in `dtype` over the map's region view (no copy where the map needs no padding)."""
    if is_exporting():
        return _region_sums_in_three_axes(x, grid, dtype)
    regions = grid.pad(x).view(x.shape[0], *grid.split_shape, *x.shape[1 + grid.ndim:])  # (B, c0, s0, ..., P, M, D)
    token_axes = [2 + 2 * axis for axis in range(grid.ndim)]
    if x.device.type == "cpu":  # ATen's CPU reduction is 4-10x faster one axis at a time (one launch each elsewhere)
        sums = regions
        for axis in reversed(token_axes):
            sums = sums.sum(axis, dtype=dtype)
    else:
        sums = regions.sum(token_axes, dtype=dtype)
    return sums.flatten(1, grid.ndim).flatten(3)


def _region_sums_in_three_axes(x: Tensor, grid: RegionGrid, dtype: torch.dtype) -> Tensor:
    """`_region_sums` for exported graphs: one spatial axis at a time, each a sum over the middle axis of a 3-D
    view (rows, a region's tokens along the axis, columns). Runtimes' fast reductions take few axes: OpenVINO's
    CPU plugin ran the 8-D region view's ReduceSum in its reference kernel (a quarter of BiFormer-S's time)."""
    batch, n, features = x.shape[0], grid.ndim, x.shape[1 + grid.ndim:]  # features (P, M, D): fixed sizes
    width = math.prod(features)
    sums = grid.pad(x).reshape(batch, *grid.padded_shape, width)
    for axis in reversed(range(n)):  # (B, padded sizes before `axis`, the axis, region counts after it, width)
        rows = batch * math.prod(grid.padded_shape[:axis]) * grid.counts[axis]
        sums = sums.reshape(rows, grid.sizes[axis], math.prod(grid.counts[axis + 1:]) * width).sum(1, dtype=dtype)
    return sums.view(batch, grid.num_regions, features[0], width // features[0])


_AVERAGE_POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def region_means(x: Tensor, grid: RegionGrid, masked: bool) -> tuple[Tensor, float]:
    """(B, *S, P, M, D) -> (B, R, P, M*D) region sums or means in at least float32, and the factor that makes
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
    pair, n = x.shape[-3], grid.ndim
    x = x.to(dtype).flatten(-3)  # (B, *S, P*C)
    # ceil_mode: a window cut by the map's end averages the tokens inside the map
    means = _AVERAGE_POOLS[n](channels_first(x), grid.sizes, ceil_mode=True)  # (B, P*C, *regions inside the map)
    if tuple(means.shape[2:]) != grid.counts:  # no window starts beyond the map: regions of padding get zeros
        means = F.pad(means, [value for count, found in zip(reversed(grid.counts), reversed(means.shape[2:]))
                              for value in (0, count - found)])
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
