"""BRA as an nn.Module: qkv projection, routed attention, local context enhancement, output projection."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.depthwise import depthwise_conv
from ..layers.exporting import size_min
from ..layers.inplace import add_into
from ..layers.layout import channels_first, channels_last
from .backends import check_backend_name
from .functional import bi_level_routing_attention
from .regions import Routing, padding_mode


class RecordedRouting(NamedTuple):
    """What one forward of a recording layer routed, for visualisation (tensors detached).

    q, k: (B, *S', M, D) as passed to the op (S' includes the "legacy" mode's padding, if any).
    """

    routing: Routing
    q: Tensor
    k: Tensor
    scale: float


class BiLevelRoutingAttention(nn.Module):
    """Bi-Level Routing Attention layer.

    out = proj(BRA(q, k, v) + lepe(v)), where q, k, v = qkv(x) and lepe is a depthwise conv
    ("local context enhancement") over the value map.

    Args:
        dim: channels in and out.
        num_heads: attention heads; must divide dim.
        n_win: regions per axis (an int, or one per axis: (rows, cols) for images). A map smaller than
            n_win uses as many regions as it has tokens along that axis, and topk is capped at the region
            count, so the layer runs on any map of at least one token.
        topk: routed key regions per query region.
        region_size: if given, n_win follows from each input instead: as many regions per axis as
            regions of at most region_size tokens along each axis need, so that the attention's cost
            stays linear in the map's size at any resolution.
        qk_scale: logit scale; default dim ** -0.5 (the original's full-width scale, not per head).
        side_dwconv: kernel of the lepe conv; 0 disables it.
        padding: "masked" (default), "legacy" or "legacy_nchw" (see `bi_level_routing_attention`),
            the last two so that the original checkpoints run as they were trained. "legacy" pads
            the input to a multiple of n_win before the qkv projection and attends to those padded
            tokens, as the original layer's `auto_pad=True` did; "legacy_nchw" is the original NCHW
            layer: floor-sized regions, q, k, v zero-padded after the projection, region means
            over the map's tokens only, padded keys attended to.
        channels_last: input/output as (B, H, W, C) if True, else (B, C, H, W).
        spatial_dims: the input's spatial axes: 2 (images), 1 (sequences, (B, L, C)) or 3 (volumes or clips,
            (B, D, H, W, C) or channels first (B, C, D, H, W)); the lepe conv is a depthwise conv over them.
        backend: force an attention backend (see `biformer.ops.available_backends()`).

    Set `record_routing = True` to make forward keep its last routing and q, k in `last_routing`
    (a `RecordedRouting`), e.g. to draw which regions a query attends to.
    """

    record_routing: bool = False

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int | tuple[int, ...] = 7,
        topk: int = 4,
        *,
        qk_scale: float | None = None,
        side_dwconv: int = 3,
        padding: str = "masked",
        channels_last: bool = True,
        qkv_bias: bool = True,
        backend: str | None = None,
        region_size: int | None = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must be positive and divide dim={dim}")
        padding_mode(padding)  # ValueError naming the modes
        if side_dwconv < 0 or (side_dwconv and side_dwconv % 2 == 0):
            raise ValueError(f"side_dwconv must be 0 (off) or an odd kernel size, got {side_dwconv}")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if region_size is not None and (isinstance(region_size, bool) or not isinstance(region_size, int)
                                        or region_size < 1):
            raise ValueError(f"region_size must be a positive int (tokens per region side) or None, got {region_size!r}")
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        self.n_win = tuple(n_win) if isinstance(n_win, (tuple, list)) else (n_win,) * spatial_dims
        if not all(isinstance(count, int) and count >= 1 for count in self.n_win):
            raise ValueError(f"n_win must be a positive int or one per spatial axis, got {n_win!r}")
        if len(self.n_win) != spatial_dims:
            raise ValueError(f"n_win has {len(self.n_win)} values for {spatial_dims} spatial axes: give an int or "
                             f"{spatial_dims} values, one per axis")
        self.spatial_dims = spatial_dims
        self.region_size = region_size
        self.dim = dim
        self.num_heads = num_heads
        self.topk = topk
        self.scale = qk_scale or dim**-0.5
        self.padding = padding
        self.channels_last = channels_last
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = depthwise_conv(dim, side_dwconv, spatial_dims) if side_dwconv else None
        self.proj = nn.Linear(dim, dim)
        self.last_routing: RecordedRouting | None = None

    def extra_repr(self) -> str:
        regions = f"region_size={self.region_size}" if self.region_size is not None else f"n_win={self.n_win}"
        return f"dim={self.dim}, num_heads={self.num_heads}, {regions}, topk={self.topk}, padding={self.padding!r}"

    def regions_per_axis(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The region grid of a map of `shape`: n_win, at most the map's size; with region_size, what that size
        needs."""
        if self.region_size is not None:
            return tuple((size + self.region_size - 1) // self.region_size for size in shape)
        return tuple(size_min(count, size) for count, size in zip(self.n_win, shape))  # no guard, nothing baked

    def forward(self, x: Tensor) -> Tensor:
        channel_axis = -1 if self.channels_last else 1
        if x.dim() != self.spatial_dims + 2 or x.shape[channel_axis] != self.dim:
            axes = {1: "L", 2: "H, W", 3: "D, H, W"}[self.spatial_dims]
            layout = f"(B, {axes}, C)" if self.channels_last else f"(B, C, {axes})"
            raise ValueError(f"expected a {layout} input with C={self.dim} channels, got shape {tuple(x.shape)}")
        if not self.channels_last:
            x = channels_last(x)
        shape = tuple(x.shape[1:-1])  # 0-d tensors under torch.jit.trace: the trace follows them
        n_win = self.regions_per_axis(shape)
        topk = size_min(self.topk, math.prod(n_win))
        if self.padding == "legacy":
            # the original pads the normalised tokens before the projection: padded q/k/v are the biases
            x = F.pad(x, [0, 0] + [value for size, count in zip(reversed(shape), reversed(n_win))
                                   for value in (0, -size % count)])
        qkv = self.qkv(x)  # a view, not unflatten: the TorchScript ONNX exporter bakes unflatten's sizes in
        q, k, v = qkv.view(*qkv.shape[:-1], 3, self.num_heads, -1).unbind(-3)  # each (B, *S', M, D)
        out = bi_level_routing_attention(
            q, k, v, n_win, topk, scale=self.scale, padding=self.padding, backend=self.backend,
            return_routing=self.record_routing,
        )
        if self.record_routing:
            out, routing = out
            self.last_routing = RecordedRouting(routing, q.detach(), k.detach(), self.scale)
        out = out.flatten(-2)
        if self.lepe is not None:  # into the conv's output, never `out`: a backend may keep it for its backward
            out = add_into(channels_last(self.lepe(channels_first(v.flatten(-2)))), out)
        out = self.proj(out)
        if self.padding == "legacy":  # drop its padding (other modes' outputs are the map's size already: a narrow
            for axis, size in enumerate(shape):  # there would cost two full copies in the backward)
                out = out.narrow(1 + axis, 0, size)
        return out if self.channels_last else channels_first(out)


@contextlib.contextmanager
def use_backend(model: nn.Module, name: str | None) -> Iterator[None]:
    """Force attention backend `name` (None: automatic dispatch) on every `BiLevelRoutingAttention`
    in `model` inside the `with` block; each layer gets its own setting back on exit, also on errors.

    ValueError if `name` is no registered backend (whether it can run is checked at the forward).
    """
    check_backend_name(name)
    layers = [module for module in model.modules() if isinstance(module, BiLevelRoutingAttention)]
    saved = [layer.backend for layer in layers]
    try:
        for layer in layers:
            layer.backend = name
        yield
    finally:
        for layer, backend in zip(layers, saved):
            layer.backend = backend
