"""Triton backend: fused routed attention, forward and backward, on CUDA.

Each forward program takes a tile of query tokens (one region, a slice of a large one, or several
tiny ones), walks their routed regions loading keys and values by index with an online softmax,
and writes the output and the log-sum-exp; the (B, R, K, T, M, D) gathered tensor of the reference
never exists. The backward recomputes the probabilities from the log-sum-exp: one kernel for dq
(query-centric, like the forward) and one for dk/dv (key-centric, over the query regions that
routed to each key region), so no atomics and deterministic results. See `_triton_kernels`.

Registered as `torch.library` custom ops, so torch.compile keeps them as single calls. float32
uses 3xTF32 matmuls (not plain TF32) so that it matches the reference to 1e-4. TRITON_INTERPRET=1 runs the
kernels on CPU tensors, for tests without a GPU (slow; never picked automatically).
"""
from __future__ import annotations

import importlib.util
import math
import os
from types import ModuleType

import torch
from torch import Tensor

from ..regions import RegionGrid
from .inputs import RoutedAttentionInputs
from .spec import Backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
TILE = 64  # query/key tile rows (tokens) of the forward and dq kernels
# float32 dots as three TF32 tensor-core products: float32 accuracy (1e-6 from the reference on an
# H100) at 2-5x the speed of "ieee" FMA dots, whose backward was 4x slower than the reference's.
# Their split operands need more shared memory: above 64-wide heads they overflow an H100's 227 KiB.
FLOAT32_PRECISION, WIDE_HEAD_FLOAT32_PRECISION, MAX_TF32X3_BLOCK = "tf32x3", "ieee", 64


# looked up once: torch.compile cannot trace importlib
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _unavailable() -> str | None:
    """Why the Triton kernels cannot run here (None: they can); both Triton backends ask it."""
    if not TRITON_INSTALLED:
        return "the triton package is not installed"
    if not (torch.cuda.is_available() or _interpreting()):
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU, for testing)"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(inputs: RoutedAttentionInputs) -> list[str]:
    """What the declaration cannot say: CPU only in the interpreter, the head-dim limit, int32 addressing; both
    Triton backends ask it."""
    q, v = inputs.q, inputs.v
    reasons = []
    if q.device.type == "cpu" and not _interpreting():
        reasons.append("inputs are on cpu; Triton kernels run on CPU only under TRITON_INTERPRET=1")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        reasons.append(f"head dims {q.shape[-1]}/{v.shape[-1]} exceed {MAX_HEAD_DIM}")
    largest = max(_largest_offset(t) for t in (q, inputs.k, v))
    if largest >= 2**31:
        reasons.append(f"element offsets up to {largest} exceed the kernels' int32 addressing; use smaller batches")
    return reasons


def _largest_offset(x: Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(x.shape, x.stride()))


def _is_fast_for(inputs: RoutedAttentionInputs) -> bool:
    """Measured on an H100 (`biformer bench op`, BiFormer-T/S stages, batch 64): the forward beats the reference at
    every stage; forward+backward does too, except with regions of under 16 tokens (stage 3's 2x2), where the
    reference's few large batched matmuls run about 10% faster."""
    return not inputs.needs_backward or inputs.grid.tokens_per_region >= 16


def attend(inputs: RoutedAttentionInputs, indices: Tensor) -> Tensor:
    q, k, v, grid, scale, masked = inputs.q, inputs.k, inputs.v, inputs.grid, inputs.scale, inputs.masked
    out, _ = torch.ops.biformer.triton_routed_attention(
        q, k, v, indices, grid.cols, grid.region_h, grid.region_w, scale, masked
    )
    return out


# on CPU the kernels run only interpreted, for tests: never dispatched automatically there
BACKEND = Backend(
    "triton", attend, devices=("cuda", "cpu"), dtypes=DTYPES, auto_devices=("cuda",), unavailable=_unavailable,
    check=_check, is_fast_for=_is_fast_for,
)


def _kernels() -> ModuleType:
    from . import _triton_kernels  # compiled or interpreted as TRITON_INTERPRET says at first import

    return _triton_kernels


def _head_dim_block(dim: int) -> int:
    return max(16, 1 << (dim - 1).bit_length())


def _strides(x: Tensor) -> tuple[int, int, int, int]:
    """(batch, row, column, head) strides; the kernels need the head dim contiguous."""
    return x.stride()[:4]


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _tiles(tokens: int, regions: int) -> tuple[int, int, int, int]:
    """Token slots per region (a power of two), regions packed per query tile, tiles per region, query tiles."""
    tokens_p2 = 1 << (tokens - 1).bit_length()
    slots = max(1, TILE // tokens_p2)
    chunks = max(1, tokens_p2 // TILE)
    return tokens_p2, slots, chunks, math.ceil(regions / slots) * chunks


def score_tiling(grid: RegionGrid, topk: int) -> tuple[int, int]:
    """(computed, valid) score entries per (batch, head) of the forward: every query tile (TILE rows) meets
    a TILE-column key tile per routed region and chunk, of which the block-diagonal mask keeps 1 / slots;
    valid = each query token with each token of its routed regions."""
    tokens = grid.tokens_per_region
    _, _, chunks, query_tiles = _tiles(tokens, grid.num_regions)
    return query_tiles * topk * chunks * TILE * TILE, grid.num_regions * tokens * topk * tokens


class _Geometry:
    """Region sizes and the tile layout of one call (see `_triton_kernels`)."""

    def __init__(self, q: Tensor, v: Tensor, indices: Tensor, cols: int, region_h: int, region_w: int) -> None:
        self.batch, self.height, self.width, self.heads, self.qk_dim = q.shape
        self.v_dim = v.shape[-1]
        self.num_regions, self.topk = indices.shape[1:]
        self.cols, self.region_h, self.region_w = cols, region_h, region_w
        self.tokens_p2, self.slots, self.chunks, self.query_tiles = _tiles(region_h * region_w, self.num_regions)
        self.key_tile = max(16, min(self.tokens_p2, TILE))
        self.key_chunks = max(1, self.tokens_p2 // self.key_tile)

    def float32_precision(self) -> str:
        narrow = max(_head_dim_block(self.qk_dim), _head_dim_block(self.v_dim)) <= MAX_TF32X3_BLOCK
        return FLOAT32_PRECISION if narrow else WIDE_HEAD_FLOAT32_PRECISION

    def constants(self, masked: bool, dtype: torch.dtype) -> dict:
        return dict(
            HEADS=self.heads, R=self.num_regions, COLS=self.cols, REGION_H=self.region_h, REGION_W=self.region_w,
            D=self.qk_dim, DV=self.v_dim, BLOCK_D=_head_dim_block(self.qk_dim), BLOCK_DV=_head_dim_block(self.v_dim),
            MASKED=masked, PRECISION=self.float32_precision() if dtype == torch.float32 else "tf32",
            WIDEN=_interpreting() and dtype == torch.bfloat16,
        )

    def query_tile_constants(self) -> dict:
        """The forward's and the dq kernel's tile layout (with `constants`)."""
        return dict(TOPK=self.topk, TILE=TILE, T_P=self.tokens_p2, G=self.slots, CHUNKS=self.chunks)

    def key_tile_constants(self) -> dict:
        """The dk/dv kernel's tile layout (with `constants`)."""
        return dict(KEY_TILE=self.key_tile, CHUNKS=self.key_chunks)


@torch.library.custom_op("biformer::triton_routed_attention", mutates_args=())
def triton_routed_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, cols: int, region_h: int, region_w: int, scale: float,
    masked: bool,
) -> tuple[Tensor, Tensor]:
    """q, k (B, H, W, M, D), v (B, H, W, M, Dv), indices (B, R, K) -> out (B, H, W, M, Dv), lse (B, M, H, W).

    Regions of region_h x region_w tokens, `cols` to a row, cover the map from its top left."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    geo = _Geometry(q, v, indices, cols, region_h, region_w)
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    lse = torch.empty(geo.batch, geo.heads, geo.height, geo.width, dtype=torch.float32, device=q.device)
    _kernels()._routed_attention_fwd[(geo.query_tiles, geo.batch * geo.heads)](
        q, k, v, out, lse, indices.contiguous(), *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        scale, geo.height, geo.width, **geo.query_tile_constants(), **geo.constants(masked, q.dtype),
    )
    return out, lse


@triton_routed_attention.register_fake
def forward_fake(q, k, v, indices, cols, region_h, region_w, scale, masked):
    """Output (B, H, W, M, Dv) and log-sum-exp (B, M, H, W) of a forward of these inputs, unfilled."""
    batch, height, width, heads, _ = q.shape
    return v.new_empty(v.shape), q.new_empty((batch, heads, height, width), dtype=torch.float32)


def inverse_routing(indices: Tensor) -> tuple[Tensor, Tensor]:
    """The query regions that routed to each key region, as CSR: for batch b and key region j they are
    routed_by[start[b*R + j] : start[b*R + j + 1]]. indices (B, R, K) -> routed_by (B*R*K,), start (B*R + 1,).

    Sort and binary search only: no op reads a value back to the host (bincount does, twice per call on CUDA),
    so a training step can run without host syncs and be captured in a CUDA graph."""
    batch, num_regions, topk = indices.shape
    key_regions, order = torch.sort(indices.flatten(1), dim=1, stable=True)  # (B, R*K), each row ascending
    routed_by = (order // topk).flatten()
    bounds = torch.arange(num_regions + 1, device=indices.device, dtype=key_regions.dtype).expand(batch, -1)
    start = torch.searchsorted(key_regions, bounds.contiguous())  # (B, R+1): row offsets of each key region
    start = start + key_regions.shape[1] * torch.arange(batch, device=indices.device)[:, None]
    # row b's end offset (its column R) equals row b+1's start: keep it for the last row only
    return routed_by, torch.cat([start[:, :-1].flatten(), start[-1:, -1]])


@torch.library.custom_op("biformer::triton_routed_attention_backward", mutates_args=())
def triton_routed_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, indices: Tensor,
    routed_by: Tensor, start: Tensor, cols: int, region_h: int, region_w: int, scale: float, masked: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Two kernels: dq (query-centric) and dk/dv (key-centric, over `inverse_routing`'s CSR)."""
    q, k, v, grad_out = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(grad_out)
    geo = _Geometry(q, v, indices, cols, region_h, region_w)
    batch, num_regions = indices.shape[:2]
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kernels, constants = _kernels(), geo.constants(masked, q.dtype)
    kernels._routed_attention_bwd_dq[(geo.query_tiles, batch * geo.heads)](
        q, k, v, grad_out, grad_q, lse, delta, indices.contiguous(),
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(grad_q),
        scale, geo.height, geo.width, **geo.query_tile_constants(), **constants,
    )
    kernels._routed_attention_bwd_dkv[(num_regions * geo.key_chunks, batch * geo.heads)](
        q, k, v, grad_out, grad_k, grad_v, lse, delta, routed_by, start,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(grad_k), *_strides(grad_v),
        scale, geo.height, geo.width, **geo.key_tile_constants(), **constants,
    )
    return grad_q, grad_k, grad_v


@triton_routed_attention_backward.register_fake
def _(grad_out, q, k, v, lse, delta, indices, routed_by, start, cols, region_h, region_w, scale, masked):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def setup_context(ctx, inputs, output) -> None:
    """What a backward of a forward op of this signature needs (both Triton backends use it)."""
    q, k, v, indices, cols, region_h, region_w, scale, masked = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, indices)
    ctx.geometry = (cols, region_h, region_w, scale, masked)
    ctx.set_materialize_grads(False)  # the log-sum-exp gets no gradient


def _backward(ctx, grad_out: Tensor | None, grad_lse: Tensor | None):
    if grad_out is None:
        return (None,) * 9
    q, k, v, out, lse, indices = ctx.saved_tensors
    # delta_i = sum_j p_ij dp_ij = dO_i . O_i, per query token and head: (B, M, H, W)
    delta = (grad_out.float() * out.float()).sum(-1).permute(0, 3, 1, 2).contiguous()
    routed_by, start = inverse_routing(indices)
    grads = triton_routed_attention_backward(grad_out, q, k, v, lse, delta, indices, routed_by, start, *ctx.geometry)
    return *grads, None, *(None,) * len(ctx.geometry)  # none for the indices and the geometry


triton_routed_attention.register_autograd(_backward, setup_context=setup_context)
