"""Indexed backend: routed attention in chunks of query regions, keys and values read by index.

The reference copies every routed region topk times (a (B, R, K, T, M, D) tensor) and its
backward scatters that copy back with an accumulating index_put. Here a chunk of query regions
gathers its own tokens and those of its routed regions straight from the (B, *S, M, D) maps,
which stay in cache, computes softmax attention with batched matmuls, and writes its output rows
back in place; the backward recomputes (or reuses) the probabilities and adds the key/value
gradients back with `index_add_`. Nothing of size topk x (q, k or v) is ever allocated and q, k,
v are never copied into another layout, so memory stays linear in tokens for any topk.

Both directions are `torch.library` custom ops: torch.compile keeps each as one call and compiles
what is around it. Half precision is computed in float32 where gradients follow, else in its own dtype.

Shape legend: B batch, S... the (padded) map's 1, 2 or 3 spatial axes, M heads, D head dim, R regions, T tokens per
region, K topk, P = B*R query regions, n regions in a chunk.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...layers.inplace import autograd_records
from ...layers.sdpa import HALF_DTYPES
from ..regions import RegionGrid
from .inputs import RoutedAttentionInputs
from .spec import Backend

# Bytes of per-chunk temporaries (scores, probabilities, gathered keys/values and their
# gradients); small enough to stay in cache, large enough for efficient batched matmuls.
CHUNK_BYTES = 8 << 20


def attend(inputs: RoutedAttentionInputs, indices: Tensor) -> Tensor:
    q, k, v, grid, scale, masked = inputs.q, inputs.k, inputs.v, inputs.grid, inputs.scale, inputs.masked
    head_dim = q.shape[-1]
    keys = indices.shape[-1] * grid.tokens_per_region
    # keep the probabilities for the backward where they are no bigger than q and k: that saves
    # a matmul and a softmax; otherwise recompute them, so that memory stays ~ q, k, v
    train = autograd_records(q, k, v)
    keep_probs = train and keys <= 2 * head_dim
    bias = None
    if masked and grid.is_padded:
        bias = torch.zeros(grid.num_regions, grid.tokens_per_region, dtype=_compute_dtype(q.dtype, train), device=q.device)
        bias.masked_fill_(~grid.valid_tokens(q.device), float("-inf"))
    out, _ = torch.ops.biformer.indexed_attention(
        grid.pad(q), grid.pad(k), grid.pad(v), indices, list(grid.sizes), bias, scale, train, keep_probs
    )
    return grid.crop(out)


def _compute_dtype(dtype: torch.dtype, train: bool) -> torch.dtype:
    """Half inputs are computed in float32 where gradients follow (the backward is in float32), and
    in their own dtype at inference: on CPU that uses the bfloat16 matmul units (BiFormer-T/S stage
    shapes, 2 threads: 25-30% faster forward than in float32)."""
    return torch.float32 if train and dtype in HALF_DTYPES else dtype


class _HeadRows(NamedTuple):
    """A (B, *S, M, D) map as a (rows, D) matrix: token n's head m is row n * token_stride + m."""

    matrix: Tensor
    token_stride: int


def _head_rows(x: Tensor) -> _HeadRows:
    """A view where the layout allows (contiguous maps, and q/k/v unbound from a packed qkv), else a copy."""
    heads, dim = x.shape[-2:]
    strides, token_axis = x.stride(), x.dim() - 3  # the last spatial axis
    # tokens evenly spaced, each a whole number of D-wide head rows (contiguous, or unbound from a packed qkv)
    evenly = all(strides[axis] == x.shape[axis + 1] * strides[axis + 1] for axis in range(token_axis))
    if strides[-1] == 1 and strides[-2] == dim and strides[token_axis] % dim == 0 and evenly:
        token_stride = strides[token_axis] // dim
        rows = (x.shape[:-2].numel() - 1) * token_stride + heads
        return _HeadRows(x.as_strided((rows, dim), (dim, 1)), token_stride)
    return _HeadRows(x.contiguous().view(-1, dim), heads)


class _Plan:
    """Which head rows each query region reads and writes, and how the query regions are chunked.

    Row indices are computed once per call for all query regions (a chunk slices them), per token
    stride: q, k and v unbound from one packed qkv share one. A chunk's scores are computed in blocks of
    its regions' query rows (`blocks`) against the keys it gathered once: large regions (a clip's, thousands of
    tokens routed to several regions) would otherwise need scores far larger than q, k and v.
    """

    def __init__(self, q: Tensor, v: Tensor, indices: Tensor, region_size: list[int], dtype: torch.dtype) -> None:
        batch, *shape, self.heads, qk_dim = q.shape
        v_dim = v.shape[-1]
        topk = indices.shape[2]
        grid = RegionGrid(tuple(shape), tuple(size // region for size, region in zip(shape, region_size)),
                          tuple(region_size))
        self.tokens = grid.tokens_per_region
        self.keys = topk * self.tokens
        self.dtype = dtype
        device = q.device
        region_tokens = grid.slot_offsets(device)  # (R, T)
        batch_base = torch.arange(batch, device=device).view(batch, 1, 1) * math.prod(shape)
        self.query_tokens = (batch_base + region_tokens).flatten(0, 1)  # (P, T)
        self.key_tokens = (batch_base[..., None] + region_tokens[indices]).flatten(0, 1).flatten(1)  # (P, K*T)
        self.key_regions = indices.flatten(0, 1)  # (P, K)
        self.head = torch.arange(self.heads, device=device).view(1, -1, 1)
        self._rows: dict[tuple[str, int], Tensor] = {}
        element = torch.finfo(self.dtype).bits // 8
        # query rows per block: the scores, probabilities and their gradient of one region's block within the budget
        self.block = max(1, min(self.tokens, CHUNK_BYTES // (3 * self.heads * self.keys * element)))
        per_region = self.heads * (3 * self.block * self.keys + 2 * (self.keys + self.tokens) * (qk_dim + v_dim))
        self.step = max(1, CHUNK_BYTES // (per_region * element))

    def blocks(self) -> list[slice]:
        """The blocks of query rows (of the T in a region) whose scores are computed at once."""
        return [slice(start, start + self.block) for start in range(0, self.tokens, self.block)]

    def chunks(self) -> range:
        return range(0, self.query_tokens.shape[0], self.step)

    def routed_regions(self, start: int) -> Tensor:
        """(n, K) key regions routed for the chunk at `start`."""
        return self.key_regions[start: start + self.step]

    def probability_rows(self, start: int) -> slice:
        """The chunk at `start`'s (n*M) matrices in the kept (P*M, T, K*T) probabilities."""
        return slice(start * self.heads, (start + self.step) * self.heads)

    def rows(self, side: str, token_stride: int, start: int) -> Tensor:
        """Head rows, head-major per region, of the chunk at `start`: side "query" (n*M*T,) or "key" (n*M*K*T,)."""
        key = (side, token_stride)
        if key not in self._rows:
            tokens = self.query_tokens if side == "query" else self.key_tokens
            self._rows[key] = (tokens[:, None, :] * token_stride + self.head).flatten()
        per_region = self.heads * self._length(side)
        return self._rows[key][start * per_region: (start + self.step) * per_region]

    def gather(self, x: _HeadRows, side: str, start: int) -> Tensor:
        """A chunk's per-head matrices (n*M, L, D) in the compute dtype, L = T (query) or K*T (key)."""
        picked = x.matrix.index_select(0, self.rows(side, x.token_stride, start))
        return picked.view(-1, self._length(side), picked.shape[-1]).to(self.dtype)

    def _length(self, side: str) -> int:
        """Tokens per query region: T on the query side, K*T on the key side."""
        return self.tokens if side == "query" else self.keys

    def probabilities(self, q: Tensor, k: Tensor, bias: Tensor | None, regions: Tensor, scale: float) -> Tensor:
        """Softmax of the scaled scores (n*M, T, K*T) of query matrices q against gathered keys k."""
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
        if bias is not None:  # (R, T) per key region, the same for every head and query
            scores = scores.view(-1, self.heads, scores.shape[1], scores.shape[-1])
            scores += bias[regions].view(regions.shape[0], 1, 1, -1)
            scores = scores.flatten(0, 1)
        return torch.softmax(scores, dim=-1)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, regions: Tensor, scale: float) -> Tensor:
        """Softmax attention (n*M, T, Dv) in one fused call, for a forward that keeps no probabilities."""
        n = regions.shape[0]
        mask = None if bias is None else bias[regions].view(n, 1, 1, -1)
        as_regions = lambda t: t.unflatten(0, (n, self.heads))  # noqa: E731
        out = F.scaled_dot_product_attention(as_regions(q), as_regions(k), as_regions(v), attn_mask=mask, scale=scale)
        return out.flatten(0, 1)


@torch.library.custom_op("biformer::indexed_attention", mutates_args=())
def indexed_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, region_size: list[int], bias: Tensor | None,
    scale: float, train: bool, keep_probs: bool,
) -> tuple[Tensor, Tensor]:
    """Routed attention on a map whose sizes are multiples of the region size (one per spatial axis).

    q, k (B, *S, M, D), v (B, *S, M, Dv), indices (B, R, K) -> out (B, *S, M, Dv); bias
    (R, T) is added to the logits of each key region's tokens (-inf masks padded tokens). Also
    returns the probabilities (B*R*M, T, K*T) for the backward if keep_probs, else an empty tensor.
    train: gradients will follow (half inputs are then computed in float32, as their backward is).
    """
    with torch.autocast(q.device.type, enabled=False):  # the op picks its compute dtype itself
        plan = _Plan(q, v, indices, region_size, _compute_dtype(q.dtype, train))
        q_rows, k_rows, v_rows = _head_rows(q), _head_rows(k), _head_rows(v)
        out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        out_rows = out.view(-1, v.shape[-1])
        probs = q.new_empty((plan.query_tokens.shape[0] * plan.heads, plan.tokens, plan.keys) if keep_probs else (0,),
                            dtype=plan.dtype)
        for start in plan.chunks():
            q_chunk, k_routed = plan.gather(q_rows, "query", start), plan.gather(k_rows, "key", start)
            v_routed, regions = plan.gather(v_rows, "key", start), plan.routed_regions(start)
            if keep_probs:
                chunk_probs = plan.probabilities(q_chunk, k_routed, bias, regions, scale)
                probs[plan.probability_rows(start)] = chunk_probs
                chunk_out = torch.bmm(chunk_probs, v_routed)
            else:  # fused: scores and probabilities never leave the cache
                chunk_out = torch.cat([plan.attention(q_chunk[:, block], k_routed, v_routed, bias, regions, scale)
                                       for block in plan.blocks()], dim=1)
            out_rows.index_copy_(0, plan.rows("query", v.shape[-2], start), chunk_out.flatten(0, 1).to(out.dtype))
        return out, probs


@indexed_attention.register_fake
def _(q, k, v, indices, region_size, bias, scale, train, keep_probs):
    tokens = math.prod(region_size)
    probs_shape = (indices.shape[0] * indices.shape[1] * q.shape[-2], tokens, indices.shape[2] * tokens)
    return v.new_empty(v.shape), q.new_empty(probs_shape if keep_probs else (0,), dtype=_compute_dtype(q.dtype, train))


@torch.library.custom_op("biformer::indexed_attention_backward", mutates_args=())
def indexed_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, indices: Tensor, region_size: list[int],
    bias: Tensor | None, probs: Tensor, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `indexed_attention` for q, k, v; probabilities are recomputed where probs is empty."""
    with torch.autocast(q.device.type, enabled=False):  # also when autograd runs it inside an autocast region
        plan = _Plan(q, v, indices, region_size, _compute_dtype(q.dtype, train=True))
        q_rows, k_rows, v_rows, grad_rows = _head_rows(q), _head_rows(k), _head_rows(v), _head_rows(grad_out)
        grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # every token is in exactly one query region
        # key/value gradients accumulate over the query regions routed to them (in float32 for half inputs)
        grad_k = torch.zeros(k.shape, dtype=plan.dtype, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=plan.dtype, device=v.device)
        grad_q_rows, grad_k_rows, grad_v_rows = (t.view(-1, t.shape[-1]) for t in (grad_q, grad_k, grad_v))
        for start in plan.chunks():
            q_chunk, grad_chunk = plan.gather(q_rows, "query", start), plan.gather(grad_rows, "query", start)
            k_routed, v_routed = plan.gather(k_rows, "key", start), plan.gather(v_rows, "key", start)
            grad_q_chunk, grad_k_routed, grad_v_routed = torch.empty_like(q_chunk), None, None
            for block in plan.blocks():  # the keys' gradients sum over the blocks of query rows
                q_block, grad_block = q_chunk[:, block], grad_chunk[:, block]
                if probs.numel():
                    block_probs = probs[plan.probability_rows(start)][:, block]
                else:
                    block_probs = plan.probabilities(q_block, k_routed, bias, plan.routed_regions(start), scale)
                grad_v_routed = _add_product(grad_v_routed, block_probs.transpose(1, 2), grad_block)
                grad_probs = torch.bmm(grad_block, v_routed.transpose(1, 2))
                # softmax backward, times the logit scale that both q and k gradients carry
                grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, block_probs, -1, plan.dtype).mul_(scale)
                grad_q_chunk[:, block] = torch.bmm(grad_scores, k_routed)
                grad_k_routed = _add_product(grad_k_routed, grad_scores.transpose(1, 2), q_block)
            grad_q_rows.index_copy_(0, plan.rows("query", q.shape[-2], start), grad_q_chunk.flatten(0, 1).to(q.dtype))
            key_rows = plan.rows("key", k.shape[-2], start)
            grad_k_rows.index_add_(0, key_rows, grad_k_routed.flatten(0, 1))
            grad_v_rows.index_add_(0, key_rows, grad_v_routed.flatten(0, 1))
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype)


@indexed_attention_backward.register_fake
def _(grad_out, q, k, v, indices, region_size, bias, probs, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _add_product(total: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """total + a @ b (batched); a @ b where total is None."""
    return torch.bmm(a, b) if total is None else total.baddbmm_(a, b)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, indices, region_size, bias, scale, train, keep_probs = inputs
    ctx.save_for_backward(q, k, v, indices, bias, output[1])
    ctx.region_size, ctx.scale = region_size, scale
    ctx.set_materialize_grads(False)  # the probabilities get no gradient: do not allocate zeros for them


def _backward(ctx, grad_out: Tensor | None, grad_probs: Tensor | None):
    if grad_out is None:
        return (None,) * 9
    q, k, v, indices, bias, probs = ctx.saved_tensors
    grads = indexed_attention_backward(grad_out, q, k, v, indices, ctx.region_size, bias, probs, ctx.scale)
    return *grads, None, None, None, None, None, None


indexed_attention.register_autograd(_backward, setup_context=_setup_context)


# measured on CPUs only: on CUDA, dispatch takes the reference where the Triton kernels step aside
BACKEND = Backend("indexed", attend, auto_devices=("cpu",), spatial_axes=(1, 2, 3))
