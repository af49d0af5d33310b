"""BRA as an nn.Module: qkv projection, routed attention, local context enhancement, output projection."""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.depthwise import DepthwiseConv2d
from ..layers.exporting import size_min
from ..layers.inplace import add_into
from .backends import check_backend_name
from .functional import bi_level_routing_attention
from .regions import Routing, padding_mode


class RecordedRouting(NamedTuple):
    """What one forward of a recording layer routed, for visualisation (tensors detached).

    q, k: (B, H', W', M, D) as passed to the op (H', W' include the "legacy" mode's padding, if any).
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
        n_win: regions per side (int or (rows, cols)). A map smaller than n_win uses as many
            regions as it has tokens per side, and topk is capped at the region count, so the layer
            runs on any map of at least 1x1.
        topk: routed key regions per query region.
        region_size: if given, n_win follows from each input instead: as many regions per side as
            regions of at most region_size x region_size tokens need, so that the attention's cost
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
        backend: force an attention backend (see `biformer.ops.available_backends()`).

    Set `record_routing = True` to make forward keep its last routing and q, k in `last_routing`
    (a `RecordedRouting`), e.g. to draw which regions a query attends to.
    """

    record_routing: bool = False

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int | tuple[int, int] = 7,
        topk: int = 4,
        *,
        qk_scale: float | None = None,
        side_dwconv: int = 3,
        padding: str = "masked",
        channels_last: bool = True,
        qkv_bias: bool = True,
        backend: str | None = None,
        region_size: int | None = None,
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
        self.region_size = region_size
        self.dim = dim
        self.num_heads = num_heads
        self.n_win = (n_win, n_win) if isinstance(n_win, int) else tuple(n_win)
        self.topk = topk
        self.scale = qk_scale or dim**-0.5
        self.padding = padding
        self.channels_last = channels_last
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = DepthwiseConv2d(dim, side_dwconv) if side_dwconv else None
        self.proj = nn.Linear(dim, dim)
        self.last_routing: RecordedRouting | None = None

    def extra_repr(self) -> str:
        regions = f"region_size={self.region_size}" if self.region_size is not None else f"n_win={self.n_win}"
        return f"dim={self.dim}, num_heads={self.num_heads}, {regions}, topk={self.topk}, padding={self.padding!r}"

    def regions_per_side(self, height: int, width: int) -> tuple[int, int]:
        """The region grid of an H x W map: n_win, at most the map's size; with region_size, what that size needs."""
        if self.region_size is not None:
            size = self.region_size
            return (height + size - 1) // size, (width + size - 1) // size
        return size_min(self.n_win[0], height), size_min(self.n_win[1], width)  # no guard, nothing baked on export

    def forward(self, x: Tensor) -> Tensor:
        channel_axis = -1 if self.channels_last else 1
        if x.dim() != 4 or x.shape[channel_axis] != self.dim:
            layout = "(B, H, W, C)" if self.channels_last else "(B, C, H, W)"
            raise ValueError(f"expected a {layout} input with C={self.dim} channels, got shape {tuple(x.shape)}")
        if not self.channels_last:
            x = x.permute(0, 2, 3, 1)
        height, width = x.shape[1], x.shape[2]  # 0-d tensors under torch.jit.trace: the trace follows them
        n_win = self.regions_per_side(height, width)
        topk = size_min(self.topk, n_win[0] * n_win[1])
        if self.padding == "legacy":
            # the original pads the normalised tokens before the projection: padded q/k/v are the biases
            pad_bottom, pad_right = -height % n_win[0], -width % n_win[1]
            x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
        qkv = self.qkv(x)  # a view, not unflatten: the TorchScript ONNX exporter bakes unflatten's sizes in
        q, k, v = qkv.view(*qkv.shape[:-1], 3, self.num_heads, -1).unbind(3)  # each (B, H', W', M, D)
        out = bi_level_routing_attention(
            q, k, v, n_win, topk, scale=self.scale, padding=self.padding, backend=self.backend,
            return_routing=self.record_routing,
        )
        if self.record_routing:
            out, routing = out
            self.last_routing = RecordedRouting(routing, q.detach(), k.detach(), self.scale)
        out = out.flatten(3)
        if self.lepe is not None:  # into the conv's output, never `out`: a backend may keep it for its backward
            out = add_into(self.lepe(v.flatten(3).permute(0, 3, 1, 2)).permute(0, 2, 3, 1), out)
        out = self.proj(out)
        if self.padding == "legacy":  # drop its padding (other modes' outputs are the map's size already: a narrow
            out = out.narrow(1, 0, height).narrow(2, 0, width)  # there would cost two full copies in the backward)
        return out if self.channels_last else out.permute(0, 3, 1, 2)


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
