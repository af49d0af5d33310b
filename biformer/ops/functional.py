"""Bi-Level Routing Attention as a function of q, k, v."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..layers.exporting import traced_as_int
from .backends import select_backend
from .backends.inputs import RoutedAttentionInputs
from .regions import RegionGrid, Routing, padding_mode


def _is_size(n: object) -> bool:
    """An int, a symbolic one (torch.export's sizes) or one that torch.jit.trace records (a 0-d integer tensor)."""
    if isinstance(n, Tensor):
        return torch.jit.is_tracing() and n.dim() == 0 and not n.is_floating_point() and n.dtype != torch.bool
    return isinstance(n, (int, torch.SymInt)) and not isinstance(n, bool)


SPATIAL_LAYOUTS = {1: "(batch, length, heads, head_dim)", 2: "(batch, height, width, heads, head_dim)",
                   3: "(batch, depth, height, width, heads, head_dim)"}


def _per_axis(n_win: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    if _is_size(n_win):
        return (n_win,) * ndim
    if isinstance(n_win, Sequence) and len(n_win) == ndim and all(_is_size(n) for n in n_win):
        return tuple(n_win)
    if isinstance(n_win, Sequence) and all(_is_size(n) for n in n_win):
        raise ValueError(f"n_win has {len(n_win)} values, and the map has {ndim} spatial axes: give an int (the "
                         f"same on every axis) or {ndim} values, one per axis")
    raise ValueError(f"n_win must be an int or one int per spatial axis ({ndim} here), got {n_win!r}")


def region_grid(shape: Sequence[int], n_win: int | Sequence[int], padding: str = "masked") -> RegionGrid:
    """The region grid BRA uses for a map of `shape` (1, 2 or 3 spatial sizes) in padding mode `padding` (see
    `biformer.ops.regions.PADDING_MODES`); n_win: regions per axis, an int or one per axis. ValueError if n_win
    does not fit the map."""
    shape = tuple(shape)
    counts = _per_axis(n_win, len(shape))
    if all(isinstance(n, int) for n in (*counts, *shape)):  # symbolic sizes: the caller clamped them
        if min(counts) < 1:
            raise ValueError(f"n_win must be positive, got {n_win!r}")
        if any(count > size for count, size in zip(counts, shape)):
            map_size = "x".join(map(str, shape))
            raise ValueError(f"n_win={n_win!r} asks for more regions along an axis than the {map_size} map has tokens; "
                             f"use n_win <= {shape if len(shape) > 1 else shape[0]}")
    # ceilings as (a + b - 1) // b: exact and symbolic for torch.export's sizes, and of non-negative operands,
    # where ONNX's truncating integer division agrees with floor division
    if padding_mode(padding).floor_regions:  # as many floor-sized regions as cover the map
        sizes = tuple(size // count for size, count in zip(shape, counts))
        counts = tuple((size + region - 1) // region for size, region in zip(shape, sizes))
    else:
        sizes = tuple((size + count - 1) // count for size, count in zip(shape, counts))
    return RegionGrid(shape=shape, counts=counts, sizes=sizes)


def _check_topk(topk: int, grid: RegionGrid) -> None:
    """ValueError unless 1 <= topk <= the region count (asked of plain ints only: a symbolic topk is the caller's
    clamp of one, and asking would put a guard into an exported graph)."""
    checkable = isinstance(topk, int) and isinstance(grid.num_regions, int)
    if not _is_size(topk) or (checkable and not 1 <= topk <= grid.num_regions):
        raise ValueError(f"topk must be an int in [1, {grid.num_regions}] (the number of regions, "
                         f"{'x'.join(map(str, grid.counts))}), got {topk!r}")


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() - 3 not in SPATIAL_LAYOUTS:
            raise ValueError(
                f"{name} must have shape {SPATIAL_LAYOUTS[2]} (rank 5), or 1 or 3 spatial axes in place of (height, "
                f"width) (rank 4 or 6), got shape {tuple(t.shape)}; for channels-first maps use "
                "biformer.ops.BiLevelRoutingAttention"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    layout = SPATIAL_LAYOUTS[q.dim() - 3]
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v must match q in all but its last axis, {tuple(q.shape[:-1])} of {layout}, got "
                         f"{tuple(v.shape[:-1])}")
    if 0 in q.shape[1:-2]:
        raise ValueError(f"q has an empty map: shape {tuple(q.shape)} is {layout}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def bi_level_routing_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    n_win: int | Sequence[int],
    topk: int,
    *,
    scale: float | None = None,
    padding: str = "masked",
    backend: str | None = None,
    return_routing: bool = False,
) -> Tensor | tuple[Tensor, Routing]:
    """Bi-Level Routing Attention (BiFormer, CVPR 2023).

    Args:
        q, k: (batch, height, width, heads, head_dim); v: (batch, height, width, heads, v_head_dim); or one spatial
            axis (batch, length, ...) or three (batch, depth, height, width, ...), everything below per axis.
        n_win: regions per axis, an int or one per axis (e.g. (rows, cols)); at most the map's size there.
        topk: key regions each query region attends to, 1 <= topk <= the number of regions
            (their product over the axes; more in "legacy_nchw" mode where the map is not divisible).
        scale: attention logit scale; default head_dim ** -0.5. (The original BiFormer layers use
            (heads*head_dim) ** -0.5; `BiLevelRoutingAttention` passes that.)
        padding: how the map, zero-padded at the end of each axis to whole regions, is treated
            (`biformer.ops.regions.PADDING_MODES`):
            "masked": padded tokens take no part in region means, routing or attention, so the
            valid outputs never depend on the padding;
            "legacy": padded tokens count in region means and are attended to (the original
            legacy layer with auto_pad=True);
            "legacy_nchw": the original NCHW layer: regions of floor(H / rows) x floor(W / cols)
            tokens, as many as cover the map (a 30x33 map with n_win=7: 8x9 regions of 4x4),
            region means over the map's tokens only, padded keys attended to.
        backend: force a backend by name (see `available_backends()`); None picks the fastest
            one that can run. A forced backend that cannot run raises ValueError with its reasons and
            every other backend's.
        return_routing: also return a `Routing` (indices, logits, grid; weights on request).

    Returns:
        Output shaped like v, and the `Routing` if return_routing.

    Specification (what every backend computes), in plain PyTorch::

        B, H, W, M, D = q.shape
        rows, cols = n_win                     # or (n_win, n_win)
        rh, rw = ceil(H / rows), ceil(W / cols)   # region size; R = rows*cols regions of T = rh*rw tokens
        # "legacy_nchw": rh, rw = H // rows, W // cols; then rows, cols = ceil(H / rh), ceil(W / rw)
        pad = lambda x: F.pad(x, (0, 0, 0, 0, 0, cols*rw - W, 0, rows*rh - H))  # zeros, bottom/right
        regions = lambda x: rearrange(pad(x), "b (r h) (c w) m d -> b (r c) (h w) m d", h=rh, w=rw)
        inside = regions(torch.ones(1, H, W, 1, 1))[0, :, :, 0, 0] > 0  # (R, T) slots inside the map
        valid = inside if padding == "masked" else torch.ones_like(inside)   # attended keys
        counted = inside if padding != "legacy" else torch.ones_like(inside)  # tokens in region means
        # 1. routing, on detached float32 tensors, all heads jointly
        total = lambda x: (regions(x.detach()).flatten(3) * counted[..., None]).sum(2)   # (B, R, C)
        mean = lambda x: total(x) / counted.sum(1).clamp(min=1)[:, None]
        logits = (mean(q) * scale) @ mean(k).transpose(1, 2)        # (B, R, R)
        logits[:, :, ~counted.any(1)] = -inf                        # key regions of padding only
        idx = logits.topk(topk, dim=-1).indices                     # (B, R, topk)
        # 2. token attention of each query region to the tokens of its routed regions
        qr, kr, vr = regions(q), regions(k), regions(v)
        b = torch.arange(B)[:, None, None]
        k_sel = rearrange(kr[b, idx], "b r k t m d -> b r m (k t) d")
        v_sel = rearrange(vr[b, idx], "b r k t m d -> b r m (k t) d")
        attn = (rearrange(qr, "b r t m d -> b r m t d") * scale) @ k_sel.transpose(-1, -2)
        attn = attn.masked_fill(~rearrange(valid[idx], "b r k t -> b r 1 1 (k t)"), -inf).softmax(-1)
        out = rearrange(attn @ v_sel, "b (r c) m (h w) d -> b (r h) (c w) m d", c=cols, h=rh)[:, :H, :W]

    Work on regions that are not routed is skipped, not masked: each query region touches
    topk*T keys, not H*W.
    """
    _check_inputs(q, k, v)
    mode = padding_mode(padding)
    head_dim = traced_as_int(q.shape[-1])  # the trace follows the map's sizes
    grid = region_grid(q.shape[1:-2], n_win, padding)
    _check_topk(topk, grid)
    if scale is None:
        scale = head_dim**-0.5
    inputs = RoutedAttentionInputs(q, k, v, grid, topk, mode.mask_attention, scale)
    chosen = select_backend(backend, inputs)
    routing = chosen.route(q, k, grid, topk, scale, mode.mask_routing)
    out = chosen.attend(inputs, routing.indices)
    return (out, routing) if return_routing else out
