"""triton_region backend: routed attention with one query region per program and no wasted score entries.

The kernels of `_triton_region_kernels`: a program takes a query region's tokens (up to QUERY_TILE) and all
TOPK x T routed key tokens, packed back to back; regions of up to 8 tokens (with heads under 128 wide) multiply
in registers rather than padding 4 query rows to a 16-row tensor-core tile. Against the `triton` backend's tiles, the useful share of
computed score entries at BiFormer-S's stages (224 px) goes from 1.0 / 0.236 / 0.048 to 1.0 / 1.0 / 1.0
(`score_tiling`). Routing (region means, affinity, top-k) and the backward's inverse routing take one launch
each; the backward has no host syncs and computes delta = dO . O inside the dq kernel. Sequences, images and
volumes or clips alike: the kernels take three spatial axes, and a map of fewer is a view with unit leading axes
(`as_volume`). Opt-in (`backend="triton_region"`) until a GPU run has measured it.
"""
from __future__ import annotations

import math
from dataclasses import replace
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from ..regions import RegionGrid, Routing
from ..regions import route as regions_route
from . import triton_attention
from .inputs import RoutedAttentionInputs
from .triton_attention import _head_dim_block, _interpreting, _unit_last

MAX_QUERY_TILE = 64  # query rows of a program (larger regions take several programs)
MAX_KEY_TILE = 64  # routed keys per inner step: BiFormer's 64 routed keys in one step
MIN_DOT_ROWS = 16  # tl.dot's smallest operand side
WIDE_HEAD = 128  # head dims from which even small regions use dots
# regions up to which routing and inverse routing run fused, one program per image holding R x R tiles (at 256
# regions they spill 110 KB and 21 KB in an offline sm_90 compile): beyond, the plain-op routing and CSR
MAX_FUSED_REGIONS = 64
ROUTING_CHANNELS = 32  # channels of q and k summed per step of the routing kernel
ROUTING_WARPS = 8


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class Tiling:
    """Tile sizes of one call, from the region size and the routed key count."""

    def __init__(self, tokens: int, topk: int, head_dim: int) -> None:
        self.topk = topk
        # register products of wide heads spill (head dim 256: 4.5 KB in an offline sm_90 compile): dots instead,
        # on query tiles padded to tl.dot's 16 rows
        self.use_dot = _next_pow2(tokens) >= MIN_DOT_ROWS or head_dim >= WIDE_HEAD
        self.query_tile = min(max(_next_pow2(tokens), MIN_DOT_ROWS if self.use_dot else 1), MAX_QUERY_TILE)
        self.query_chunks = math.ceil(tokens / self.query_tile)
        self.key_tile = max(min(_next_pow2(topk * tokens), MAX_KEY_TILE), MIN_DOT_ROWS)
        self.key_chunks = math.ceil(topk * tokens / self.key_tile)
        # the register products of small regions spread over 8 warps stay at 72 registers per thread (sm_90,
        # offline compile: 128 with 2 warps, 167 with 4); tensor-core tiles take 4
        self.num_warps = 4 if self.use_dot else 8

    def routed_key_constants(self) -> dict:
        """The forward's and the dq kernel's key tiles (with `_constants`)."""
        return dict(TOPK=self.topk, KEY_TILE=self.key_tile, KEY_CHUNKS=self.key_chunks)

    def computed_scores(self, regions: int) -> int:
        """Score entries the forward computes per (batch, head)."""
        return regions * self.query_chunks * self.query_tile * self.key_chunks * self.key_tile


def score_tiling(grid: RegionGrid, topk: int, head_dim: int) -> tuple[int, int]:
    """(computed, valid) score entries per (batch, head) of this backend's forward: valid = each query token
    with each token of its routed regions."""
    tokens = grid.tokens_per_region
    computed = Tiling(tokens, topk, head_dim).computed_scores(grid.num_regions)
    return computed, grid.num_regions * tokens * topk * tokens


class VolumeGeometry(NamedTuple):
    """A grid as the kernels see it: three spatial axes (depth, height, width), a sequence as 1 x 1 x L and an
    image as 1 x H x W."""

    counts: tuple[int, int, int]  # regions per axis
    sizes: tuple[int, int, int]  # tokens per region per axis

    @classmethod
    def of(cls, grid: RegionGrid) -> "VolumeGeometry":
        missing = (1,) * (3 - grid.ndim)
        return cls(missing + tuple(grid.counts), missing + tuple(grid.sizes))

    def constants(self) -> dict:
        """The kernels' region constants: the region counts of a depth slab and the region's size."""
        (_, rows, cols), (depth, height, width) = self.counts, self.sizes
        return dict(REGIONS_H=rows, REGIONS_W=cols, REGION_D=depth, REGION_H=height, REGION_W=width)


def as_volume(x: Tensor) -> Tensor:
    """(B, *S, M, D) with 1-3 spatial axes -> (B, depth, height, width, M, D), a view with unit leading axes."""
    while x.dim() < 6:
        x = x.unsqueeze(1)
    return x


def _volume_strides(x: Tensor) -> tuple[int, ...]:
    """(batch, depth, row, column, head) strides; the kernels need the head dim contiguous."""
    return x.stride()[:5]


def route(q: Tensor, k: Tensor, grid: RegionGrid, topk: int, scale: float, masked: bool) -> Routing:
    """`biformer.ops.regions.route` in one launch per call (`_route_fused`): region means read in the input's
    dtype and summed in float32, region affinity and top-k in registers; up to MAX_FUSED_REGIONS regions."""
    if grid.num_regions > MAX_FUSED_REGIONS:
        return regions_route(q, k, grid, topk, scale, masked)
    geometry = VolumeGeometry.of(grid)
    logits, indices = torch.ops.biformer.triton_region_route(
        as_volume(q.detach()), as_volume(k.detach()), list(geometry.counts), list(geometry.sizes), topk, scale, masked)
    return Routing(indices=indices, logits=logits, grid=grid)


@torch.library.custom_op("biformer::triton_region_route", mutates_args=())
def triton_region_route(
    q: Tensor, k: Tensor, counts: list[int], sizes: list[int], topk: int, scale: float, masked: bool,
) -> tuple[Tensor, Tensor]:
    """q, k (B, depth, height, width, M, D) -> logits (B, R, R) float32, indices (B, R, topk) int64."""
    q, k = _unit_last(q), _unit_last(k)
    batch, depth, height, width, heads, dim = q.shape
    geometry = VolumeGeometry(tuple(counts), tuple(sizes))
    logits, indices = _route_outputs(q, math.prod(counts), topk)
    _kernels()._route_fused[(batch,)](
        q, k, logits, indices, *_volume_strides(q), *_volume_strides(k), scale, depth, height, width, MASKED=masked,
        num_warps=ROUTING_WARPS, **routing_constants(geometry, heads, dim, topk),
    )
    return logits, indices


def routing_constants(geometry: VolumeGeometry, heads: int, dim: int, topk: int) -> dict:
    """The routing kernel's constants but MASKED: regions padded to a power of two of at least tl.dot's 16."""
    regions = math.prod(geometry.counts)
    return dict(R=regions, R_P=max(MIN_DOT_ROWS, _next_pow2(regions)), C=heads * dim, D=dim,
                BLOCK_C=ROUTING_CHANNELS, TOPK=topk, TOPK_P=_next_pow2(topk), **geometry.constants())


def inverse_routing_constants(regions: int, topk: int) -> dict:
    return dict(R=regions, R_P=_next_pow2(regions), TOPK=topk)


def _route_outputs(q: Tensor, regions: int, topk: int) -> tuple[Tensor, Tensor]:
    batch = q.shape[0]
    return (q.new_empty((batch, regions, regions), dtype=torch.float32),
            q.new_empty((batch, regions, topk), dtype=torch.long))


@triton_region_route.register_fake
def _(q, k, counts, sizes, topk, scale, masked):
    return _route_outputs(q, math.prod(counts), topk)


def attend(inputs: RoutedAttentionInputs, indices: Tensor) -> Tensor:
    q, k, v, grid, scale, masked = inputs.q, inputs.k, inputs.v, inputs.grid, inputs.scale, inputs.masked
    geometry = VolumeGeometry.of(grid)
    out, _ = torch.ops.biformer.triton_region_attention(
        as_volume(q), as_volume(k), as_volume(v), indices, list(geometry.counts), list(geometry.sizes), scale, masked
    )
    return out.view(v.shape)


# runs where the triton backend runs, on 1-, 2- and 3-D maps; opt-in (auto_devices empty) until it has run on a GPU
BACKEND = replace(triton_attention.BACKEND, name="triton_region", attend=attend, auto_devices=(), is_fast_for=None,
                  route=route, spatial_axes=(1, 2, 3))


def _kernels() -> ModuleType:
    from . import _triton_region_kernels

    return _triton_region_kernels


def _constants(q: Tensor, v: Tensor, indices: Tensor, geometry: VolumeGeometry, masked: bool) -> tuple[dict, Tiling]:
    heads, qk_dim, v_dim = q.shape[-2], q.shape[-1], v.shape[-1]
    tiling = Tiling(math.prod(geometry.sizes), indices.shape[-1], max(qk_dim, v_dim))
    wide = max(_head_dim_block(qk_dim), _head_dim_block(v_dim)) > triton_attention.MAX_TF32X3_BLOCK
    float32_precision = triton_attention.WIDE_HEAD_FLOAT32_PRECISION if wide else triton_attention.FLOAT32_PRECISION
    return dict(
        HEADS=heads, R=indices.shape[1], D=qk_dim, DV=v_dim, **geometry.constants(),
        BLOCK_D=_head_dim_block(qk_dim), BLOCK_DV=_head_dim_block(v_dim), QUERY_TILE=tiling.query_tile,
        QUERY_CHUNKS=tiling.query_chunks, USE_DOT=tiling.use_dot, MASKED=masked,
        PRECISION=float32_precision if q.dtype == torch.float32 else "tf32",
        WIDEN=_interpreting() and q.dtype == torch.bfloat16, num_warps=tiling.num_warps,
    ), tiling


@torch.library.custom_op("biformer::triton_region_attention", mutates_args=())
def triton_region_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, counts: list[int], sizes: list[int], scale: float,
    masked: bool,
) -> tuple[Tensor, Tensor]:
    """q, k (B, depth, height, width, M, D), v (..., M, Dv), indices (B, R, K) -> out shaped like v, lse (B, M,
    depth, height, width)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    batch, depth, height, width, heads, _ = q.shape
    constants, tiling = _constants(q, v, indices, VolumeGeometry(tuple(counts), tuple(sizes)), masked)
    out, lse = _forward_outputs(q, v)
    _kernels()._region_attention_fwd[(indices.shape[1] * tiling.query_chunks, batch * heads)](
        q, k, v, out, lse, indices.contiguous(), *_volume_strides(q), *_volume_strides(k), *_volume_strides(v),
        *_volume_strides(out), scale, depth, height, width, **tiling.routed_key_constants(), **constants,
    )
    return out, lse


def _forward_outputs(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    batch, depth, height, width, heads, _ = q.shape
    return (torch.empty(v.shape, dtype=v.dtype, device=v.device),
            torch.empty(batch, heads, depth, height, width, dtype=torch.float32, device=q.device))


@triton_region_attention.register_fake
def _(q, k, v, indices, counts, sizes, scale, masked):
    return _forward_outputs(q, v)


@torch.library.custom_op("biformer::triton_region_attention_backward", mutates_args=())
def triton_region_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, indices: Tensor,
    routed_by: Tensor, start: Tensor, counts: list[int], sizes: list[int], scale: float, masked: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Two kernels: dq with delta (query-centric), then dk/dv (key-centric over the inverse routing)."""
    q, k, v, grad_out = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(grad_out)
    batch, depth, height, width, heads, _ = q.shape
    constants, tiling = _constants(q, v, indices, VolumeGeometry(tuple(counts), tuple(sizes)), masked)
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    kernels, grid = _kernels(), (indices.shape[1] * tiling.query_chunks, batch * heads)
    kernels._region_attention_bwd_dq[grid](
        q, k, v, out, grad_out, grad_q, lse, delta, indices.contiguous(),
        *_volume_strides(q), *_volume_strides(k), *_volume_strides(v), *_volume_strides(out),
        *_volume_strides(grad_out), *_volume_strides(grad_q),
        scale, depth, height, width, **tiling.routed_key_constants(), **constants,
    )
    kernels._region_attention_bwd_dkv[grid](
        q, k, v, grad_out, grad_k, grad_v, lse, delta, routed_by, start,
        *_volume_strides(q), *_volume_strides(k), *_volume_strides(v), *_volume_strides(grad_out),
        *_volume_strides(grad_k), *_volume_strides(grad_v), scale, depth, height, width, **constants,
    )
    return grad_q, grad_k, grad_v


@triton_region_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, indices, routed_by, start, counts, sizes, scale, masked):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("biformer::triton_region_inverse_routing", mutates_args=())
def triton_region_inverse_routing(indices: Tensor) -> tuple[Tensor, Tensor]:
    """`triton_attention.inverse_routing` (the same CSR) in one launch: indices (B, R, K) -> routed_by
    (B*R*K,), start (B*R + 1,), int64."""
    batch, regions, topk = indices.shape
    routed_by, start = _inverse_routing_outputs(indices)
    _kernels()._inverse_routing[(batch,)](indices.contiguous(), routed_by, start, batch,
                                          **inverse_routing_constants(regions, topk))
    return routed_by, start


def _inverse_routing_outputs(indices: Tensor) -> tuple[Tensor, Tensor]:
    return indices.new_empty(indices.numel()), indices.new_empty(indices.shape[0] * indices.shape[1] + 1)


@triton_region_inverse_routing.register_fake
def _(indices):
    return _inverse_routing_outputs(indices)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, indices, counts, sizes, scale, masked = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, indices)
    ctx.geometry = (counts, sizes, scale, masked)
    ctx.set_materialize_grads(False)  # the log-sum-exp gets no gradient


def _backward(ctx, grad_out: Tensor | None, grad_lse: Tensor | None):
    if grad_out is None:
        return (None,) * 8
    q, k, v, out, lse, indices = ctx.saved_tensors
    if indices.shape[1] > MAX_FUSED_REGIONS:
        routed_by, start = triton_attention.inverse_routing(indices)
    else:
        routed_by, start = triton_region_inverse_routing(indices)
    grads = triton_region_attention_backward(grad_out, q, k, v, out, lse, indices, routed_by, start, *ctx.geometry)
    return *grads, None, *(None,) * len(ctx.geometry)  # none for the indices and the geometry


triton_region_attention.register_autograd(_backward, setup_context=_setup_context)
