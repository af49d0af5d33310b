"""Triton kernels of routed region attention (forward, dQ, dK/dV), flash-attention style.

Imported only when the triton backend runs: `triton.jit` decides at import whether kernels are
compiled or interpreted (TRITON_INTERPRET=1, used by the CPU tests), so the variable must be
set before this module is first imported.

Tiles: a query tile holds TILE rows. Regions of T_P = next_pow2(T) <= TILE token slots are
packed G = TILE // T_P to a tile (so 2x2-token regions still fill a matrix-multiply tile), each
slot walking its own routed regions; a key tile holds the same slots' k-th routed regions and a
block-diagonal mask keeps every query to its own slot's keys. Larger regions span T_P // TILE
tiles (CHUNKS). Tokens are addressed through the (B, H, W, M, D) strides, so q, k, v may be views
of a packed qkv; slots outside the map read as zeros (legacy padding) or are masked (masked mode).
The key/value gradients are computed key-region by key-region from the inverse routing (which
query regions routed to it), so there are no atomics and results are deterministic.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """a @ b, accumulated in float32. WIDEN: bfloat16 operands as float32 (Triton 3.8's interpreter
    mis-reads bfloat16 in tl.dot; compiled kernels never widen)."""
    if WIDEN:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _token_coords(region, token, COLS: tl.constexpr, REGION_H: tl.constexpr, REGION_W: tl.constexpr):
    """(row h, column w) on the padded map of token `token` of region `region` (row-major both)."""
    h = (region // COLS) * REGION_H + token // REGION_W
    w = (region % COLS) * REGION_W + token % REGION_W
    return h, w


@triton.jit
def _query_slots(tile, TILE: tl.constexpr, T_P: tl.constexpr, G: tl.constexpr, CHUNKS: tl.constexpr):
    """Slot, region and token of every row of query tile `tile`."""
    rows = tl.arange(0, TILE)
    if G > 1:
        slot = rows // T_P
        region = tile * G + slot
        token = rows % T_P
    else:
        slot = rows * 0
        region = tile // CHUNKS + slot
        token = (tile % CHUNKS) * TILE + rows
    return slot, region, token


@triton.jit
def _routed_attention_fwd(
    Q, K, V, O, LSE, IDX,
    sq_b, sq_h, sq_w, sq_m, sk_b, sk_h, sk_w, sk_m, sv_b, sv_h, sv_w, sv_m, so_b, so_h, so_w, so_m,
    scale, H, W,
    HEADS: tl.constexpr, R: tl.constexpr, TOPK: tl.constexpr, COLS: tl.constexpr,
    REGION_H: tl.constexpr, REGION_W: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, TILE: tl.constexpr, T_P: tl.constexpr, G: tl.constexpr,
    CHUNKS: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1) // HEADS
    m = tl.program_id(1) % HEADS
    T: tl.constexpr = REGION_H * REGION_W
    slot, region, token = _query_slots(tile, TILE, T_P, G, CHUNKS)
    h, w = _token_coords(region, token, COLS, REGION_H, REGION_W)
    query_ok = (region < R) & (token < T) & (h < H) & (w < W)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sq_b + h[:, None] * sq_h + w[:, None] * sq_w + m * sq_m + d[None, :],
                mask=query_ok[:, None] & (d[None, :] < D), other=0.0)

    key_slot, key_region_row, key_token_base = _query_slots(tile, TILE, T_P, G, CHUNKS)  # column j's slot
    same_slot = slot[:, None] == key_slot[None, :]

    m_i = tl.full((TILE,), float("-inf"), tl.float32)
    l_i = tl.zeros((TILE,), tl.float32)
    acc = tl.zeros((TILE, BLOCK_DV), tl.float32)
    for kk in range(TOPK):
        key_region = tl.load(IDX + (b * R + key_region_row) * TOPK + kk, mask=key_region_row < R, other=0)
        for chunk in range(CHUNKS):
            key_token = key_token_base % TILE + chunk * TILE
            kh, kw = _token_coords(key_region, key_token, COLS, REGION_H, REGION_W)
            inside = (kh < H) & (kw < W)
            key_ok = (key_region_row < R) & (key_token < T)
            if MASKED:
                key_ok = key_ok & inside
            k = tl.load(K + b * sk_b + kh[:, None] * sk_h + kw[:, None] * sk_w + m * sk_m + d[None, :],
                        mask=(key_ok & inside)[:, None] & (d[None, :] < D), other=0.0)
            s = _dot(q, tl.trans(k), PRECISION, WIDEN) * scale
            s = tl.where(same_slot & key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * sv_b + kh[:, None] * sv_h + kw[:, None] * sv_w + m * sv_m + dv[None, :],
                        mask=(key_ok & inside)[:, None] & (dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, WIDEN)
            m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + b * so_b + h[:, None] * so_h + w[:, None] * so_w + m * so_m + dv[None, :],
             out.to(O.dtype.element_ty), mask=query_ok[:, None] & (dv[None, :] < DV))
    lse = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(l_safe)
    tl.store(LSE + ((b * HEADS + m) * H + h) * W + w, lse, mask=query_ok)


@triton.jit
def _routed_attention_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, IDX,
    sq_b, sq_h, sq_w, sq_m, sk_b, sk_h, sk_w, sk_m, sv_b, sv_h, sv_w, sv_m, sdo_b, sdo_h, sdo_w, sdo_m,
    sdq_b, sdq_h, sdq_w, sdq_m,
    scale, H, W,
    HEADS: tl.constexpr, R: tl.constexpr, TOPK: tl.constexpr, COLS: tl.constexpr,
    REGION_H: tl.constexpr, REGION_W: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, TILE: tl.constexpr, T_P: tl.constexpr, G: tl.constexpr,
    CHUNKS: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1) // HEADS
    m = tl.program_id(1) % HEADS
    T: tl.constexpr = REGION_H * REGION_W
    slot, region, token = _query_slots(tile, TILE, T_P, G, CHUNKS)
    h, w = _token_coords(region, token, COLS, REGION_H, REGION_W)
    query_ok = (region < R) & (token < T) & (h < H) & (w < W)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sq_b + h[:, None] * sq_h + w[:, None] * sq_w + m * sq_m + d[None, :],
                mask=query_ok[:, None] & (d[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdo_b + h[:, None] * sdo_h + w[:, None] * sdo_w + m * sdo_m + dv[None, :],
                 mask=query_ok[:, None] & (dv[None, :] < DV), other=0.0)
    stat = ((b * HEADS + m) * H + h) * W + w
    lse = tl.load(LSE + stat, mask=query_ok, other=0.0)
    delta = tl.load(DELTA + stat, mask=query_ok, other=0.0)

    key_slot, key_region_row, key_token_base = _query_slots(tile, TILE, T_P, G, CHUNKS)  # column j's slot
    same_slot = slot[:, None] == key_slot[None, :]

    dq = tl.zeros((TILE, BLOCK_D), tl.float32)
    for kk in range(TOPK):
        key_region = tl.load(IDX + (b * R + key_region_row) * TOPK + kk, mask=key_region_row < R, other=0)
        for chunk in range(CHUNKS):
            key_token = key_token_base % TILE + chunk * TILE
            kh, kw = _token_coords(key_region, key_token, COLS, REGION_H, REGION_W)
            inside = (kh < H) & (kw < W)
            key_ok = (key_region_row < R) & (key_token < T)
            if MASKED:
                key_ok = key_ok & inside
            k = tl.load(K + b * sk_b + kh[:, None] * sk_h + kw[:, None] * sk_w + m * sk_m + d[None, :],
                        mask=(key_ok & inside)[:, None] & (d[None, :] < D), other=0.0)
            v = tl.load(V + b * sv_b + kh[:, None] * sv_h + kw[:, None] * sv_w + m * sv_m + dv[None, :],
                        mask=(key_ok & inside)[:, None] & (dv[None, :] < DV), other=0.0)
            s = _dot(q, tl.trans(k), PRECISION, WIDEN) * scale
            allowed = same_slot & key_ok[None, :] & query_ok[:, None]
            p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), PRECISION, WIDEN)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, PRECISION, WIDEN)
    tl.store(DQ + b * sdq_b + h[:, None] * sdq_h + w[:, None] * sdq_w + m * sdq_m + d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=query_ok[:, None] & (d[None, :] < D))


@triton.jit
def _routed_attention_bwd_dkv(
    Q, K, V, DO, DK, DV_OUT, LSE, DELTA, ROUTED_BY, ROUTED_BY_START,
    sq_b, sq_h, sq_w, sq_m, sk_b, sk_h, sk_w, sk_m, sv_b, sv_h, sv_w, sv_m, sdo_b, sdo_h, sdo_w, sdo_m,
    sdk_b, sdk_h, sdk_w, sdk_m, sdv_b, sdv_h, sdv_w, sdv_m,
    scale, H, W,
    HEADS: tl.constexpr, R: tl.constexpr, COLS: tl.constexpr,
    REGION_H: tl.constexpr, REGION_W: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, KEY_TILE: tl.constexpr, CHUNKS: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
):
    """One key tile (a region, or a TILE-slice of one) accumulates over the query regions routed to it."""
    tile = tl.program_id(0)
    b = tl.program_id(1) // HEADS
    m = tl.program_id(1) % HEADS
    T: tl.constexpr = REGION_H * REGION_W
    key_region = tile // CHUNKS
    key_token = (tile % CHUNKS) * KEY_TILE + tl.arange(0, KEY_TILE)
    kh, kw = _token_coords(key_region, key_token, COLS, REGION_H, REGION_W)
    inside = (kh < H) & (kw < W)
    key_ok = key_token < T
    if MASKED:
        key_ok = key_ok & inside
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + b * sk_b + kh[:, None] * sk_h + kw[:, None] * sk_w + m * sk_m + d[None, :],
                mask=(key_ok & inside)[:, None] & (d[None, :] < D), other=0.0)
    v = tl.load(V + b * sv_b + kh[:, None] * sv_h + kw[:, None] * sv_w + m * sv_m + dv[None, :],
                mask=(key_ok & inside)[:, None] & (dv[None, :] < DV), other=0.0)
    dk = tl.zeros((KEY_TILE, BLOCK_D), tl.float32)
    dvacc = tl.zeros((KEY_TILE, BLOCK_DV), tl.float32)
    start = tl.load(ROUTED_BY_START + b * R + key_region)
    end = tl.load(ROUTED_BY_START + b * R + key_region + 1)
    for entry in range(start, end):
        query_region = tl.load(ROUTED_BY + entry)
        for chunk in range(CHUNKS):
            token = chunk * KEY_TILE + tl.arange(0, KEY_TILE)
            h, w = _token_coords(query_region, token, COLS, REGION_H, REGION_W)
            query_ok = (token < T) & (h < H) & (w < W)
            q = tl.load(Q + b * sq_b + h[:, None] * sq_h + w[:, None] * sq_w + m * sq_m + d[None, :],
                        mask=query_ok[:, None] & (d[None, :] < D), other=0.0)
            do = tl.load(DO + b * sdo_b + h[:, None] * sdo_h + w[:, None] * sdo_w + m * sdo_m + dv[None, :],
                         mask=query_ok[:, None] & (dv[None, :] < DV), other=0.0)
            stat = ((b * HEADS + m) * H + h) * W + w
            lse = tl.load(LSE + stat, mask=query_ok, other=0.0)
            delta = tl.load(DELTA + stat, mask=query_ok, other=0.0)
            s_t = _dot(k, tl.trans(q), PRECISION, WIDEN) * scale  # (keys, queries)
            allowed = key_ok[:, None] & query_ok[None, :]
            p_t = tl.where(allowed, tl.exp(s_t - lse[None, :]), 0.0)
            dvacc += _dot(p_t.to(do.dtype), do, PRECISION, WIDEN)
            dp_t = _dot(v, tl.trans(do), PRECISION, WIDEN)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(ds_t.to(q.dtype), q, PRECISION, WIDEN)
    store_ok = key_ok & inside
    tl.store(DK + b * sdk_b + kh[:, None] * sdk_h + kw[:, None] * sdk_w + m * sdk_m + d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=store_ok[:, None] & (d[None, :] < D))
    tl.store(DV_OUT + b * sdv_b + kh[:, None] * sdv_h + kw[:, None] * sdv_w + m * sdv_m + dv[None, :],
             dvacc.to(DV_OUT.dtype.element_ty), mask=store_ok[:, None] & (dv[None, :] < DV))
