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
def _key_mask(kh, kw, in_tile, H, W, MASKED: tl.constexpr):
    """(attend, load) masks of a key tile: attend to real slots, padded tokens excluded if MASKED
    (legacy mode attends to them as zeros); load only tokens inside the map."""
    inside = (kh < H) & (kw < W)
    attend = in_tile
    if MASKED:
        attend = attend & inside
    return attend, attend & inside


@triton.jit
def _row_offsets(b, h, w, m, s_b, s_h, s_w, s_m, cols):
    """Offsets of tokens (h, w), head m, channels cols of a (B, H, W, M, C) map with the given strides."""
    return b * s_b + h[:, None] * s_h + w[:, None] * s_w + m * s_m + cols[None, :]


@triton.jit
def _load_rows(PTR, b, h, w, m, s_b, s_h, s_w, s_m, cols, WIDTH, ok):
    return tl.load(PTR + _row_offsets(b, h, w, m, s_b, s_h, s_w, s_m, cols),
                   mask=ok[:, None] & (cols[None, :] < WIDTH), other=0.0)


@triton.jit
def _store_rows(PTR, values, b, h, w, m, s_b, s_h, s_w, s_m, cols, WIDTH, ok):
    tl.store(PTR + _row_offsets(b, h, w, m, s_b, s_h, s_w, s_m, cols), values.to(PTR.dtype.element_ty),
             mask=ok[:, None] & (cols[None, :] < WIDTH))


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
    q = _load_rows(Q, b, h, w, m, sq_b, sq_h, sq_w, sq_m, d, D, query_ok)

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
            key_ok, load_ok = _key_mask(kh, kw, (key_region_row < R) & (key_token < T), H, W, MASKED)
            k = _load_rows(K, b, kh, kw, m, sk_b, sk_h, sk_w, sk_m, d, D, load_ok)
            s = _dot(q, tl.trans(k), PRECISION, WIDEN) * scale
            s = tl.where(same_slot & key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_rows(V, b, kh, kw, m, sv_b, sv_h, sv_w, sv_m, dv, DV, load_ok)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, WIDEN)
            m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    _store_rows(O, out, b, h, w, m, so_b, so_h, so_w, so_m, dv, DV, query_ok)
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
    q = _load_rows(Q, b, h, w, m, sq_b, sq_h, sq_w, sq_m, d, D, query_ok)
    do = _load_rows(DO, b, h, w, m, sdo_b, sdo_h, sdo_w, sdo_m, dv, DV, query_ok)
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
            key_ok, load_ok = _key_mask(kh, kw, (key_region_row < R) & (key_token < T), H, W, MASKED)
            k = _load_rows(K, b, kh, kw, m, sk_b, sk_h, sk_w, sk_m, d, D, load_ok)
            v = _load_rows(V, b, kh, kw, m, sv_b, sv_h, sv_w, sv_m, dv, DV, load_ok)
            s = _dot(q, tl.trans(k), PRECISION, WIDEN) * scale
            allowed = same_slot & key_ok[None, :] & query_ok[:, None]
            p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), PRECISION, WIDEN)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, PRECISION, WIDEN)
    _store_rows(DQ, dq * scale, b, h, w, m, sdq_b, sdq_h, sdq_w, sdq_m, d, D, query_ok)


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
    key_ok, load_ok = _key_mask(kh, kw, key_token < T, H, W, MASKED)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(K, b, kh, kw, m, sk_b, sk_h, sk_w, sk_m, d, D, load_ok)
    v = _load_rows(V, b, kh, kw, m, sv_b, sv_h, sv_w, sv_m, dv, DV, load_ok)
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
            q = _load_rows(Q, b, h, w, m, sq_b, sq_h, sq_w, sq_m, d, D, query_ok)
            do = _load_rows(DO, b, h, w, m, sdo_b, sdo_h, sdo_w, sdo_m, dv, DV, query_ok)
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
    _store_rows(DK, dk * scale, b, kh, kw, m, sdk_b, sdk_h, sdk_w, sdk_m, d, D, load_ok)
    _store_rows(DV_OUT, dvacc, b, kh, kw, m, sdv_b, sdv_h, sdv_w, sdv_m, dv, DV, load_ok)
