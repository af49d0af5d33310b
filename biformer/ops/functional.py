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


def _as_pair(n_win: int | Sequence[int]) -> tuple[int, int]:
    if _is_size(n_win):
        return n_win, n_win
    if isinstance(n_win, Sequence) and len(n_win) == 2 and all(_is_size(n) for n in n_win):
        return n_win[0], n_win[1]
    raise ValueError(f"n_win must be an int or a (rows, cols) pair of ints, got {n_win!r}")


def region_grid(height: int, width: int, n_win: int | Sequence[int], padding: str = "masked") -> RegionGrid:
    """The region grid BRA uses for an H x W map in padding mode `padding` (see
    `biformer.ops.regions.PADDING_MODES`); ValueError if n_win does not fit the map."""
    rows, cols = _as_pair(n_win)
    if all(isinstance(n, int) for n in (rows, cols, height, width)):  # symbolic sizes: the caller clamped them
        if rows < 1 or cols < 1:
            raise ValueError(f"n_win must be positive, got {n_win!r}")
        if rows > height or cols > width:
            raise ValueError(
                f"n_win={n_win!r} asks for more regions per side than the {height}x{width} map has tokens; "
                f"use n_win <= ({height}, {width})"
            )
    # ceilings as (a + b - 1) // b: exact and symbolic for torch.export's sizes, and of non-negative operands,
    # where ONNX's truncating integer division agrees with floor division
    if padding_mode(padding).floor_regions:  # as many floor-sized regions as cover the map
        region_h, region_w = height // rows, width // cols
        rows, cols = (height + region_h - 1) // region_h, (width + region_w - 1) // region_w
    else:
        region_h, region_w = (height + rows - 1) // rows, (width + cols - 1) // cols
    return RegionGrid(height=height, width=width, rows=rows, cols=cols, region_h=region_h, region_w=region_w)


def _check_topk(topk: int, grid: RegionGrid) -> None:
    """ValueError unless 1 <= topk <= the region count (asked of plain ints only: a symbolic topk is the caller's
    clamp of one, and asking would put a guard into an exported graph)."""
    checkable = isinstance(topk, int) and isinstance(grid.num_regions, int)
    if not _is_size(topk) or (checkable and not 1 <= topk <= grid.num_regions):
        raise ValueError(
            f"topk must be an int in [1, {grid.num_regions}] (the number of regions, {grid.rows}x{grid.cols}), got {topk!r}"
        )


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(
                f"{name} must have shape (batch, height, width, heads, head_dim) (rank 5), got shape {tuple(t.shape)}; "
                "for (batch, channels, height, width) maps use biformer.ops.BiLevelRoutingAttention"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:4] != q.shape[:4]:
        raise ValueError(
            f"v must match q in (batch, height, width, heads) = {tuple(q.shape[:4])}, got {tuple(v.shape[:4])}"
        )
    if q.shape[1] == 0 or q.shape[2] == 0:
        raise ValueError(f"q has an empty map: shape {tuple(q.shape)} is (batch, height, width, heads, head_dim)")
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
        q, k: (batch, height, width, heads, head_dim); v: (batch, height, width, heads, v_head_dim).
        n_win: regions per side, an int or (rows, cols); at most the map's height/width.
        topk: key regions each query region attends to, 1 <= topk <= the number of regions
            (rows*cols; more in "legacy_nchw" mode where the map is not divisible).
        scale: attention logit scale; default head_dim ** -0.5. (The original BiFormer layers use
            (heads*head_dim) ** -0.5; `BiLevelRoutingAttention` passes that.)
        padding: how the map, zero-padded at the bottom/right to whole regions, is treated
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
    height, width, head_dim = q.shape[1], q.shape[2], traced_as_int(q.shape[-1])  # the trace follows H, W
    grid = region_grid(height, width, n_win, padding)
    _check_topk(topk, grid)
    if scale is None:
        scale = head_dim**-0.5
    inputs = RoutedAttentionInputs(q, k, v, grid, topk, mode.mask_attention, scale)
    chosen = select_backend(backend, inputs)
    routing = chosen.route(q, k, grid, topk, scale, mode.mask_routing)
    out = chosen.attend(inputs, routing.indices)
    return (out, routing) if return_routing else out
