"""Flex backend: routed attention as block-sparse `torch.nn.attention.flex_attention`.

The padded map is laid out region-major: each region's tokens contiguous, in a slot of the next
power of two tokens (flex's kernels take power-of-two blocks), slots packed several to a sparse
block where they are smaller than MIN_BLOCK (2x2-token regions: 4 to a 16-token block). The
routing becomes a `BlockMask` whose query blocks list the key blocks of their regions' routed
regions; a `mask_mod` then keeps each query to exactly its own routed regions and away from empty
slot tokens (and, if masked, from padded keys). Key blocks that need no such masking for any query
of the block are passed as full blocks, where the kernel skips the mask (8x8- and 4x4-token regions
of an unpadded map: all of them).

Limits: flex_attention runs fused only under torch.compile. The compiled function is created once
and reused; torch.compile specializes it per configuration (shapes, dtype, grad mode; not the scale,
which q carries, nor the padding treatment) and compiles each new one (about 10 s on a 2-core CPU),
up to dynamo's recompile limit (`torch._dynamo.config.recompile_limit`, 8), beyond which torch falls
back to an unfused implementation (correct, slow, with a warning). On CPU the kernels have no backward,
and inductor fails to lower them inside a compiled model: there the backend steps aside (and it was
slower than the indexed backend, see `BACKEND`). float32, bfloat16 and float16 only.

Shape legend: B batch, M heads, D head dim, R regions (Rp padded to whole blocks), T tokens per
region, S slot (T rounded up to a power of two), P regions per block, L = Rp*S sequence length.
"""
from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ...layers.inplace import autograd_records
from ..regions import RegionGrid
from .inputs import RoutedAttentionInputs
from .spec import Backend

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Smallest sparse block: flex's Triton kernels shrink their tiles to power-of-two blocks of at least 16 tokens.
MIN_BLOCK = 16
# Triton's tl.dot needs operands at least 16 wide; above 256 the kernel's tiles outgrow shared memory.
MIN_CUDA_HEAD_DIM, MAX_CUDA_HEAD_DIM = 16, 256


def _cpu_kernel_missing() -> str | None:
    """Why inductor cannot build flex's CPU kernel here (None if it can): the rule of torch's
    flex_cpu lowering (AVX2, not macOS) and a C++ compiler for inductor. Cheap checks only: this runs
    when biformer.ops is imported (torch._dynamo, which flex_attention imports, takes seconds)."""
    if sys.platform == "darwin" or not torch.cpu._is_avx2_supported() or os.getenv("ATEN_CPU_CAPABILITY") == "default":
        return "flex_attention's CPU kernel needs an x86 CPU with AVX2 (not macOS)"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler for torch.compile's CPU kernels (set CXX)"
    return None


# looked up once: torch.compile cannot trace these checks
CPU_KERNEL_MISSING = _cpu_kernel_missing()


def _unavailable() -> str | None:
    if torch.cuda.is_available() or CPU_KERNEL_MISSING is None:
        return None
    return f"no CUDA device, and {CPU_KERNEL_MISSING}"


def _check(inputs: RoutedAttentionInputs) -> list[str]:
    """What the declaration cannot say: the CPU kernel's needs, inductor inside torch.compile, CUDA's head dims."""
    q, v = inputs.q, inputs.v
    reasons = []
    if q.device.type == "cpu":
        if CPU_KERNEL_MISSING:
            reasons.append(CPU_KERNEL_MISSING)
        if torch.compiler.is_compiling():
            # seen with torch 2.14: "no choices" and AttributeError lowering errors, and a mask read as all False
            reasons.append("inside torch.compile, inductor's CPU flex_attention lowering fails on the block masks "
                           "built in the graph (outside it, this backend compiles flex_attention by itself)")
    elif q.device.type == "cuda":
        dims = (q.shape[-1], v.shape[-1])
        if min(dims) < MIN_CUDA_HEAD_DIM or max(dims) > MAX_CUDA_HEAD_DIM:
            reasons.append(
                f"head dims {dims[0]}/{dims[1]} are outside [{MIN_CUDA_HEAD_DIM}, {MAX_CUDA_HEAD_DIM}] on CUDA")
    return reasons


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=False: static shapes give the fastest kernels, and the block size must be static anyway
    return torch.compile(flex_attention, dynamic=False)


class _Layout:
    """Slot and block sizes of a grid's region-major sequence."""

    def __init__(self, grid: RegionGrid) -> None:
        self.tokens = grid.tokens_per_region
        self.slot = 1 << (self.tokens - 1).bit_length()
        self.per_block = max(1, MIN_BLOCK // self.slot)
        self.regions = grid.num_regions
        self.padded_regions = -(-self.regions // self.per_block) * self.per_block
        self.blocks = self.padded_regions // self.per_block
        self.block_size = self.per_block * self.slot
        self.length = self.padded_regions * self.slot

    def to_sequence(self, x: Tensor, grid: RegionGrid) -> Tensor:
        """(B, H, W, M, D) -> (B, M, L, D): regions in their slots, zeros in empty slot tokens and regions."""
        batch, *_, heads, dim = x.shape
        empty_slots = self.slot != self.tokens or self.padded_regions != self.regions
        sequence = (x.new_zeros if empty_slots else x.new_empty)(batch, self.padded_regions, self.slot, heads, dim)
        # one strided copy of the (padded) map into the slots (a pad of the region view was 10x slower on CPU)
        slots = sequence[:, : self.regions, : self.tokens].view(
            batch, grid.rows, grid.cols, grid.region_h, grid.region_w, heads, dim)
        slots.copy_(grid.pad(x).view(slots.shape[:2] + (grid.region_h, grid.cols, grid.region_w, heads, dim))
                    .transpose(2, 3))
        return sequence.view(batch, self.length, heads, dim).transpose(1, 2)  # flex takes strided heads as they are

    def from_sequence(self, x: Tensor, grid: RegionGrid) -> Tensor:
        """(B, M, L, D) -> (B, H, W, M, D), dropping the empty slots and the padding."""
        batch, heads, _, dim = x.shape
        x = x.transpose(1, 2).reshape(batch, self.padded_regions, self.slot, heads, dim)
        return grid.from_regions(x[:, : self.regions, : self.tokens])

    def key_slots(self, grid: RegionGrid, masked: bool, device: torch.device) -> Tensor:
        """(Rp, S) bool: slots holding a key that takes part in attention."""
        valid = grid.valid_tokens(device)
        if not masked:
            valid = torch.ones_like(valid)
        return F.pad(valid, (0, self.slot - self.tokens, 0, self.padded_regions - self.regions))


def _ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(B, Q, K) bool block table -> per query block the count (B, 1, Q) and indices (B, 1, Q, K)
    of its True key blocks, those first (the BlockMask format; indices past the count are ignored)."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None], indices[:, None]


def routing_block_mask(indices: Tensor, grid: RegionGrid, masked: bool, with_q_blocks: bool) -> BlockMask:
    """The BlockMask of routed attention over the grid's region-major sequence (`_Layout`).

    with_q_blocks: also build the transposed (query blocks per key block) tables the backward needs.
    """
    from torch.nn.attention.flex_attention import BlockMask

    layout = _Layout(grid)
    batch, num_regions, _ = indices.shape
    # routed[b, query region, key region], by comparison (a (B, R, K, Rp) temporary) rather than a
    # scatter: in a compiled graph (torch 2.14) a mask_mod read a scattered table as its initial zeros
    key_regions = torch.arange(layout.padded_regions, device=indices.device)
    routed = (indices[..., None] == key_regions).any(2)  # (B, R, Rp)
    routed = F.pad(routed, (0, 0, 0, layout.padded_regions - num_regions))
    # a key block is full for a query block if every region of the one routes to every region of the
    # other and all its slots hold keys; it is partial (masked) if any of its regions is routed at all
    pairs = routed.view(batch, layout.blocks, layout.per_block, layout.blocks, layout.per_block)
    touched = pairs.any(4).any(2)
    keys = layout.key_slots(grid, masked, indices.device)
    full = pairs.all(4).all(2) & keys.view(1, 1, layout.blocks, layout.block_size).all(-1)
    partial_counts, partial_indices = _ordered(touched & ~full)
    full_counts, full_indices = _ordered(full)
    return BlockMask.from_kv_blocks(
        partial_counts, partial_indices, full_counts, full_indices, BLOCK_SIZE=layout.block_size,
        mask_mod=_mask_mod(layout, routed, keys.flatten()), seq_lengths=(layout.length, layout.length),
        compute_q_blocks=with_q_blocks,
    )


def _mask_mod(layout: _Layout, routed: Tensor, key_slots: Tensor) -> Callable[..., Tensor]:
    """Which (query, key) pairs attend: the key's region is routed for the query's and its slot holds a
    key. Complete on its own, as flex requires: its unfused path (past dynamo's recompile limit)
    applies the mask without the block sparsity. Tables, not arithmetic on the map's size, so that
    both padding treatments share one compiled kernel."""
    slot = layout.slot

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return routed[b, q_idx // slot, kv_idx // slot] & key_slots[kv_idx]

    return mask_mod


def attend(inputs: RoutedAttentionInputs, indices: Tensor) -> Tensor:
    q, k, v, grid, scale, masked = inputs.q, inputs.k, inputs.v, inputs.grid, inputs.scale, inputs.masked
    layout = _Layout(grid)
    train = autograd_records(q, k, v)
    if not train:  # flex refuses CPU inputs that require grad even where autograd records nothing
        q, k, v = q.detach(), k.detach(), v.detach()
    block_mask = routing_block_mask(indices, grid, masked, with_q_blocks=train)
    from torch.nn.attention.flex_attention import flex_attention

    # inside a compiled model dynamo traces flex_attention itself; in eager code the compiled kernel runs
    flex = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    # q carries the scale: dynamo specializes on a float argument, so each scale would compile anew
    q_seq = layout.to_sequence(q, grid).mul_(scale)
    with torch.autocast(q.device.type, enabled=False):  # q, k, v share one dtype, which the kernels keep
        out = flex(q_seq, layout.to_sequence(k, grid), layout.to_sequence(v, grid), block_mask=block_mask, scale=1.0)
    return layout.from_sequence(out, grid)


# Opt-in only (backend="flex"): on CUDA inductor refused the 16-token blocks of small regions in its GPU tests; on
# CPU it was slower than the indexed backend at BiFormer-T's stages and compiles each new shape for about 10 s
# (docs/results.md).
BACKEND = Backend(
    "flex", attend, devices=("cuda", "cpu"), dtypes=DTYPES, forward_only_on=("cpu",), unavailable=_unavailable,
    check=_check,
)
