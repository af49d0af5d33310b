"""Triton kernels of routed region attention, one query region per program (forward, dQ with delta, dK/dV).

Imported only when the triton_region backend runs (TRITON_INTERPRET must be set before, as for
`_triton_kernels`, whose helpers these kernels share).

Every map has three spatial axes here (depth, height, width): the backend views a sequence as 1 x 1 x L and an
image as 1 x H x W, so one set of kernels serves 1-, 2- and 3-D maps, and a region is REGION_D x REGION_H x
REGION_W tokens, numbered row-major, as the regions are over the REGIONS_H x REGIONS_W regions of a depth slab.

Tiling, chosen to compute as few score entries for nothing as it can (none at BiFormer's stages): a program takes
up to QUERY_TILE tokens of one query region and all TOPK x T tokens of its routed regions, packed back to back
into key tiles of KEY_TILE (T need not be a power of two; at BiFormer's stages every query attends to 64 keys: one
key tile, a single-pass softmax). Regions of more than 8 tokens, and heads of 128 or more, use tensor-core dots
(query tiles of at least 16 rows); smaller regions (2x2 tokens: 4 query rows) multiply and sum in registers
instead of padding 4 rows to 16. Addresses are int32 (the backend refuses inputs whose offsets would not fit; the
indices are cast on load). The dq kernel also computes delta = dO . O per query token and stores it for the dk/dv
kernel, which walks key region by key region over the query regions routed to it (no atomics).

Shape legend: B batch, M heads, R regions, T tokens per region, K routed regions (TOPK), D/DV head dims; a map is
(B, depth, height, width, M, D) with strides (s_b, s_a, s_h, s_w, s_m) (a for the depth axis).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._triton_kernels import _dot


@triton.jit
def _token_coords(region, token, REGIONS_H: tl.constexpr, REGIONS_W: tl.constexpr, REGION_D: tl.constexpr,
                  REGION_H: tl.constexpr, REGION_W: tl.constexpr):
    """(depth a, row h, column w) on the padded map of token `token` of region `region` (row-major both)."""
    slab = region // (REGIONS_H * REGIONS_W)
    in_slab = region % (REGIONS_H * REGIONS_W)
    a = slab * REGION_D + token // (REGION_H * REGION_W)
    h = (in_slab // REGIONS_W) * REGION_H + (token // REGION_W) % REGION_H
    w = (in_slab % REGIONS_W) * REGION_W + token % REGION_W
    return a, h, w


@triton.jit
def _inside(a, h, w, depth, height, width):
    return (a < depth) & (h < height) & (w < width)


@triton.jit
def _key_mask(inside, in_tile, MASKED: tl.constexpr):
    """(attend, load) masks of a key tile: attend to real slots, padded tokens excluded if MASKED
    (legacy mode attends to them as zeros); load only tokens inside the map."""
    attend = in_tile
    if MASKED:
        attend = attend & inside
    return attend, attend & inside


@triton.jit
def _row_pointers(PTR, b, a, h, w, m, s_b, s_a, s_h, s_w, s_m, cols):
    """Pointers to channels `cols` of head m of tokens (a, h, w) of image b."""
    return PTR + b * s_b + a[:, None] * s_a + h[:, None] * s_h + w[:, None] * s_w + m * s_m + cols[None, :]


@triton.jit
def _load_rows(PTR, b, a, h, w, m, s_b, s_a, s_h, s_w, s_m, cols, WIDTH, ok):
    return tl.load(_row_pointers(PTR, b, a, h, w, m, s_b, s_a, s_h, s_w, s_m, cols),
                   mask=ok[:, None] & (cols[None, :] < WIDTH), other=0.0)


@triton.jit
def _store_rows(PTR, values, b, a, h, w, m, s_b, s_a, s_h, s_w, s_m, cols, WIDTH, ok):
    tl.store(_row_pointers(PTR, b, a, h, w, m, s_b, s_a, s_h, s_w, s_m, cols), values.to(PTR.dtype.element_ty),
             mask=ok[:, None] & (cols[None, :] < WIDTH))


@triton.jit
def _stat_offsets(b, m, a, h, w, depth, height, width, HEADS: tl.constexpr):
    """Where token (a, h, w) of head m of image b keeps its log-sum-exp and delta: (B, M, depth, height, width)."""
    return (((b * HEADS + m) * depth + a) * height + h) * width + w


@triton.jit
def _scores(q, k, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """q (rows, D) . k (cols, D) -> (rows, cols) float32."""
    if USE_DOT:
        return _dot(q, tl.trans(k), PRECISION, WIDEN)
    return tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _weighted(p, v, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """p (rows, cols) float32 @ v (cols, DV) -> (rows, DV) float32."""
    if USE_DOT:
        return _dot(p.to(v.dtype), v, PRECISION, WIDEN)
    return tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)


@triton.jit
def _routed_keys(IDX, b, region, chunk, R: tl.constexpr, TOPK: tl.constexpr, T: tl.constexpr,
                 REGIONS_H: tl.constexpr, REGIONS_W: tl.constexpr, REGION_D: tl.constexpr, REGION_H: tl.constexpr,
                 REGION_W: tl.constexpr, KEY_TILE: tl.constexpr, depth, height, width, MASKED: tl.constexpr):
    """Coordinates and masks of key tile `chunk` of the TOPK*T routed tokens of query region `region`."""
    j = chunk * KEY_TILE + tl.arange(0, KEY_TILE)
    routed = j < TOPK * T
    key_region = tl.load(IDX + (b * R + region) * TOPK + j // T, mask=routed, other=0).to(tl.int32)
    ka, kh, kw = _token_coords(key_region, j % T, REGIONS_H, REGIONS_W, REGION_D, REGION_H, REGION_W)
    key_ok, load_ok = _key_mask(_inside(ka, kh, kw, depth, height, width), routed, MASKED)
    return ka, kh, kw, key_ok, load_ok


@triton.jit
def _query_rows(region, chunk, QUERY_TILE: tl.constexpr, T: tl.constexpr, REGIONS_H: tl.constexpr,
                REGIONS_W: tl.constexpr, REGION_D: tl.constexpr, REGION_H: tl.constexpr, REGION_W: tl.constexpr,
                depth, height, width):
    token = chunk * QUERY_TILE + tl.arange(0, QUERY_TILE)
    a, h, w = _token_coords(region, token, REGIONS_H, REGIONS_W, REGION_D, REGION_H, REGION_W)
    return a, h, w, (token < T) & _inside(a, h, w, depth, height, width)


@triton.jit
def _program_rows(HEADS: tl.constexpr, QUERY_CHUNKS: tl.constexpr, QUERY_TILE: tl.constexpr, T: tl.constexpr,
                  REGIONS_H: tl.constexpr, REGIONS_W: tl.constexpr, REGION_D: tl.constexpr, REGION_H: tl.constexpr,
                  REGION_W: tl.constexpr, depth, height, width):
    """This program's query region, image, head, and its query tile's coordinates and mask."""
    region = tl.program_id(0) // QUERY_CHUNKS
    b = tl.program_id(1) // HEADS
    m = tl.program_id(1) % HEADS
    a, h, w, query_ok = _query_rows(region, tl.program_id(0) % QUERY_CHUNKS, QUERY_TILE, T, REGIONS_H, REGIONS_W,
                                    REGION_D, REGION_H, REGION_W, depth, height, width)
    return region, b, m, a, h, w, query_ok


@triton.jit
def _region_attention_fwd(
    Q, K, V, O, LSE, IDX,
    sq_b, sq_a, sq_h, sq_w, sq_m, sk_b, sk_a, sk_h, sk_w, sk_m, sv_b, sv_a, sv_h, sv_w, sv_m,
    so_b, so_a, so_h, so_w, so_m,
    scale, depth, height, width,
    HEADS: tl.constexpr, R: tl.constexpr, TOPK: tl.constexpr, REGIONS_H: tl.constexpr, REGIONS_W: tl.constexpr,
    REGION_D: tl.constexpr, REGION_H: tl.constexpr, REGION_W: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, QUERY_TILE: tl.constexpr, QUERY_CHUNKS: tl.constexpr,
    KEY_TILE: tl.constexpr, KEY_CHUNKS: tl.constexpr, USE_DOT: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
):
    T: tl.constexpr = REGION_D * REGION_H * REGION_W
    region, b, m, a, h, w, query_ok = _program_rows(HEADS, QUERY_CHUNKS, QUERY_TILE, T, REGIONS_H, REGIONS_W,
                                                    REGION_D, REGION_H, REGION_W, depth, height, width)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q, b, a, h, w, m, sq_b, sq_a, sq_h, sq_w, sq_m, d, D, query_ok)
    m_i = tl.full((QUERY_TILE,), float("-inf"), tl.float32)
    l_i = tl.zeros((QUERY_TILE,), tl.float32)
    acc = tl.zeros((QUERY_TILE, BLOCK_DV), tl.float32)
    for chunk in range(KEY_CHUNKS):  # one pass where all routed keys fit a tile
        ka, kh, kw, key_ok, load_ok = _routed_keys(IDX, b, region, chunk, R, TOPK, T, REGIONS_H, REGIONS_W,
                                                   REGION_D, REGION_H, REGION_W, KEY_TILE, depth, height, width,
                                                   MASKED)
        k = _load_rows(K, b, ka, kh, kw, m, sk_b, sk_a, sk_h, sk_w, sk_m, d, D, load_ok)
        s = tl.where(key_ok[None, :], _scores(q, k, USE_DOT, PRECISION, WIDEN) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V, b, ka, kh, kw, m, sv_b, sv_a, sv_h, sv_w, sv_m, dv, DV, load_ok)
        acc = acc * alpha[:, None] + _weighted(p, v, USE_DOT, PRECISION, WIDEN)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    _store_rows(O, acc / l_safe[:, None], b, a, h, w, m, so_b, so_a, so_h, so_w, so_m, dv, DV, query_ok)
    lse = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(l_safe)
    tl.store(LSE + _stat_offsets(b, m, a, h, w, depth, height, width, HEADS), lse, mask=query_ok)


@triton.jit
def _region_attention_bwd_dq(
    Q, K, V, O, DO, DQ, LSE, DELTA, IDX,
    sq_b, sq_a, sq_h, sq_w, sq_m, sk_b, sk_a, sk_h, sk_w, sk_m, sv_b, sv_a, sv_h, sv_w, sv_m,
    so_b, so_a, so_h, so_w, so_m, sdo_b, sdo_a, sdo_h, sdo_w, sdo_m, sdq_b, sdq_a, sdq_h, sdq_w, sdq_m,
    scale, depth, height, width,
    HEADS: tl.constexpr, R: tl.constexpr, TOPK: tl.constexpr, REGIONS_H: tl.constexpr, REGIONS_W: tl.constexpr,
    REGION_D: tl.constexpr, REGION_H: tl.constexpr, REGION_W: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, QUERY_TILE: tl.constexpr, QUERY_CHUNKS: tl.constexpr,
    KEY_TILE: tl.constexpr, KEY_CHUNKS: tl.constexpr, USE_DOT: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
):
    """dq of a query tile, and delta = dO . O of its tokens (written for the dk/dv kernel)."""
    T: tl.constexpr = REGION_D * REGION_H * REGION_W
    region, b, m, a, h, w, query_ok = _program_rows(HEADS, QUERY_CHUNKS, QUERY_TILE, T, REGIONS_H, REGIONS_W,
                                                    REGION_D, REGION_H, REGION_W, depth, height, width)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q, b, a, h, w, m, sq_b, sq_a, sq_h, sq_w, sq_m, d, D, query_ok)
    do = _load_rows(DO, b, a, h, w, m, sdo_b, sdo_a, sdo_h, sdo_w, sdo_m, dv, DV, query_ok)
    o = _load_rows(O, b, a, h, w, m, so_b, so_a, so_h, so_w, so_m, dv, DV, query_ok)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    stat = _stat_offsets(b, m, a, h, w, depth, height, width, HEADS)
    tl.store(DELTA + stat, delta, mask=query_ok)
    lse = tl.load(LSE + stat, mask=query_ok, other=0.0)
    dq = tl.zeros((QUERY_TILE, BLOCK_D), tl.float32)
    for chunk in range(KEY_CHUNKS):
        ka, kh, kw, key_ok, load_ok = _routed_keys(IDX, b, region, chunk, R, TOPK, T, REGIONS_H, REGIONS_W,
                                                   REGION_D, REGION_H, REGION_W, KEY_TILE, depth, height, width,
                                                   MASKED)
        k = _load_rows(K, b, ka, kh, kw, m, sk_b, sk_a, sk_h, sk_w, sk_m, d, D, load_ok)
        v = _load_rows(V, b, ka, kh, kw, m, sv_b, sv_a, sv_h, sv_w, sv_m, dv, DV, load_ok)
        s = _scores(q, k, USE_DOT, PRECISION, WIDEN) * scale
        p = tl.where(key_ok[None, :] & query_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
        ds = p * (_scores(do, v, USE_DOT, PRECISION, WIDEN) - delta[:, None])
        dq += _weighted(ds, k, USE_DOT, PRECISION, WIDEN)
    _store_rows(DQ, dq * scale, b, a, h, w, m, sdq_b, sdq_a, sdq_h, sdq_w, sdq_m, d, D, query_ok)


@triton.jit
def _region_attention_bwd_dkv(
    Q, K, V, DO, DK, DV_OUT, LSE, DELTA, ROUTED_BY, ROUTED_BY_START,
    sq_b, sq_a, sq_h, sq_w, sq_m, sk_b, sk_a, sk_h, sk_w, sk_m, sv_b, sv_a, sv_h, sv_w, sv_m,
    sdo_b, sdo_a, sdo_h, sdo_w, sdo_m, sdk_b, sdk_a, sdk_h, sdk_w, sdk_m, sdv_b, sdv_a, sdv_h, sdv_w, sdv_m,
    scale, depth, height, width,
    HEADS: tl.constexpr, R: tl.constexpr, REGIONS_H: tl.constexpr, REGIONS_W: tl.constexpr,
    REGION_D: tl.constexpr, REGION_H: tl.constexpr, REGION_W: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, QUERY_TILE: tl.constexpr, QUERY_CHUNKS: tl.constexpr,
    USE_DOT: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
):
    """A tile of one key region's tokens accumulates over the query regions routed to it (the CSR of
    `triton_attention.inverse_routing`), each in query tiles of the forward's size."""
    key_region = tl.program_id(0) // QUERY_CHUNKS
    b = tl.program_id(1) // HEADS
    m = tl.program_id(1) % HEADS
    T: tl.constexpr = REGION_D * REGION_H * REGION_W
    key_token = (tl.program_id(0) % QUERY_CHUNKS) * QUERY_TILE + tl.arange(0, QUERY_TILE)
    ka, kh, kw = _token_coords(key_region, key_token, REGIONS_H, REGIONS_W, REGION_D, REGION_H, REGION_W)
    key_ok, load_ok = _key_mask(_inside(ka, kh, kw, depth, height, width), key_token < T, MASKED)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(K, b, ka, kh, kw, m, sk_b, sk_a, sk_h, sk_w, sk_m, d, D, load_ok)
    v = _load_rows(V, b, ka, kh, kw, m, sv_b, sv_a, sv_h, sv_w, sv_m, dv, DV, load_ok)
    dk = tl.zeros((QUERY_TILE, BLOCK_D), tl.float32)
    dvacc = tl.zeros((QUERY_TILE, BLOCK_DV), tl.float32)
    start = tl.load(ROUTED_BY_START + b * R + key_region).to(tl.int32)
    end = tl.load(ROUTED_BY_START + b * R + key_region + 1).to(tl.int32)
    for entry in range(start, end):
        query_region = tl.load(ROUTED_BY + entry).to(tl.int32)
        for chunk in range(QUERY_CHUNKS):
            a, h, w, query_ok = _query_rows(query_region, chunk, QUERY_TILE, T, REGIONS_H, REGIONS_W, REGION_D,
                                            REGION_H, REGION_W, depth, height, width)
            q = _load_rows(Q, b, a, h, w, m, sq_b, sq_a, sq_h, sq_w, sq_m, d, D, query_ok)
            do = _load_rows(DO, b, a, h, w, m, sdo_b, sdo_a, sdo_h, sdo_w, sdo_m, dv, DV, query_ok)
            stat = _stat_offsets(b, m, a, h, w, depth, height, width, HEADS)
            lse = tl.load(LSE + stat, mask=query_ok, other=0.0)
            delta = tl.load(DELTA + stat, mask=query_ok, other=0.0)
            s_t = _scores(k, q, USE_DOT, PRECISION, WIDEN) * scale  # (keys, queries)
            p_t = tl.where(key_ok[:, None] & query_ok[None, :], tl.exp(s_t - lse[None, :]), 0.0)
            dvacc += _weighted(p_t, do, USE_DOT, PRECISION, WIDEN)
            ds_t = p_t * (_scores(v, do, USE_DOT, PRECISION, WIDEN) - delta[None, :])
            dk += _weighted(ds_t, q, USE_DOT, PRECISION, WIDEN)
    _store_rows(DK, dk * scale, b, ka, kh, kw, m, sdk_b, sdk_a, sdk_h, sdk_w, sdk_m, d, D, load_ok)
    _store_rows(DV_OUT, dvacc, b, ka, kh, kw, m, sdv_b, sdv_a, sdv_h, sdv_w, sdv_m, dv, DV, load_ok)


@triton.jit
def _region_sums(X, b, regions, region_ok, channels, s_b, s_a, s_h, s_w, s_m, depth, height, width,
                 C: tl.constexpr, D: tl.constexpr, REGIONS_H: tl.constexpr, REGIONS_W: tl.constexpr,
                 REGION_D: tl.constexpr, REGION_H: tl.constexpr, REGION_W: tl.constexpr, R_P: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """(R_P, BLOCK_C) float32 sums over each region's tokens inside the map of channels `channels` of a
    (B, depth, height, width, M, D) map (channel c is head c // D, dim c % D), read in its own dtype."""
    total = tl.zeros((R_P, BLOCK_C), tl.float32)
    offsets = (channels // D) * s_m + channels % D
    for t in range(REGION_D * REGION_H * REGION_W):
        a, h, w = _token_coords(regions, t, REGIONS_H, REGIONS_W, REGION_D, REGION_H, REGION_W)
        inside = region_ok & _inside(a, h, w, depth, height, width)
        total += tl.load(X + b * s_b + a[:, None] * s_a + h[:, None] * s_h + w[:, None] * s_w + offsets[None, :],
                         mask=inside[:, None] & (channels < C)[None, :], other=0.0).to(tl.float32)
    return total


@triton.jit
def _tokens_inside(start, SIZE: tl.constexpr, extent):
    """How many of the SIZE tokens from `start` along an axis lie inside the map's `extent`."""
    return tl.minimum(tl.maximum(extent - start, 0), SIZE)


@triton.jit
def _route_fused(
    Q, K, LOGITS, INDICES,
    sq_b, sq_a, sq_h, sq_w, sq_m, sk_b, sk_a, sk_h, sk_w, sk_m,
    scale, depth, height, width,
    R: tl.constexpr, R_P: tl.constexpr, REGIONS_H: tl.constexpr, REGIONS_W: tl.constexpr, REGION_D: tl.constexpr,
    REGION_H: tl.constexpr, REGION_W: tl.constexpr, C: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr,
    TOPK: tl.constexpr, TOPK_P: tl.constexpr, MASKED: tl.constexpr,
):
    """Routing of one image in one launch: region means of q and k (MASKED: over the map's tokens; else over
    all region slots, padding as zeros), logits = (q_mean * scale) @ k_mean^T with key regions of padding only
    at -inf (MASKED), and the TOPK best key regions per query region (ties: the lower index). Shapes: LOGITS
    (B, R, R) float32, INDICES (B, R, TOPK) int64."""
    b = tl.program_id(0)
    regions = tl.arange(0, R_P)
    region_ok = regions < R
    a0, h0, w0 = _token_coords(regions, 0, REGIONS_H, REGIONS_W, REGION_D, REGION_H, REGION_W)  # first tokens
    inside = (_tokens_inside(a0, REGION_D, depth) * _tokens_inside(h0, REGION_H, height)
              * _tokens_inside(w0, REGION_W, width))
    if MASKED:
        count = tl.maximum(inside, 1).to(tl.float32)
    else:
        count = tl.zeros((R_P,), tl.float32) + REGION_D * REGION_H * REGION_W
    logits = tl.zeros((R_P, R_P), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C)
        q_mean = _region_sums(Q, b, regions, region_ok, channels, sq_b, sq_a, sq_h, sq_w, sq_m, depth, height,
                              width, C, D, REGIONS_H, REGIONS_W, REGION_D, REGION_H, REGION_W, R_P,
                              BLOCK_C) / count[:, None]
        k_mean = _region_sums(K, b, regions, region_ok, channels, sk_b, sk_a, sk_h, sk_w, sk_m, depth, height,
                              width, C, D, REGIONS_H, REGIONS_W, REGION_D, REGION_H, REGION_W, R_P,
                              BLOCK_C) / count[:, None]
        logits += tl.dot(q_mean * scale, tl.trans(k_mean), input_precision="ieee")
    key_ok = region_ok
    if MASKED:
        key_ok = key_ok & (inside > 0)
    logits = tl.where(key_ok[None, :], logits, float("-inf"))
    pair = (b * R + regions[:, None]) * R + regions[None, :]
    tl.store(LOGITS + pair, logits, mask=region_ok[:, None] & region_ok[None, :])
    slots = tl.arange(0, TOPK_P)
    chosen = tl.zeros((R_P, TOPK_P), tl.int32)
    free = tl.zeros((R_P, R_P), tl.int32) + region_ok[None, :].to(tl.int32)  # 1: a key region still to pick
    ranked = tl.where(logits == logits, logits, float("-inf"))  # NaN (from NaN inputs) ranks last, never out of range
    for kk in range(TOPK):
        top = tl.max(tl.where(free > 0, ranked, float("-inf")), 1)
        index = tl.min(tl.where((ranked == top[:, None]) & (free > 0), regions[None, :], R_P), 1)
        chosen = tl.where(slots[None, :] == kk, index[:, None], chosen)
        free = tl.where(regions[None, :] == index[:, None], 0, free)
    out = (b * R + regions[:, None]) * TOPK + slots[None, :]
    tl.store(INDICES + out, chosen.to(tl.int64), mask=region_ok[:, None] & (slots[None, :] < TOPK))


@triton.jit
def _inverse_routing(IDX, ROUTED_BY, START, B, R: tl.constexpr, R_P: tl.constexpr, TOPK: tl.constexpr):
    """The CSR of `triton_attention.inverse_routing` for one image in one launch, without sorting: the routing
    matrix A[r, j] (query region r routed to key region j) gives each key region's count, its start (an
    exclusive prefix sum over key regions) and each query region's place in its list (one over query regions)."""
    b = tl.program_id(0)
    regions = tl.arange(0, R_P)
    region_ok = regions < R
    routed = tl.zeros((R_P, R_P), tl.int32)
    for kk in range(TOPK):
        key_region = tl.load(IDX + (b * R + regions) * TOPK + kk, mask=region_ok, other=R_P).to(tl.int32)
        routed += (key_region[:, None] == regions[None, :]).to(tl.int32)
    counts = tl.sum(routed, 0)  # (R_P,) per key region
    start = b * R * TOPK + tl.cumsum(counts, 0) - counts
    tl.store(START + b * R + regions, start, mask=region_ok)
    if b == B - 1:
        tl.store(START + B * R, B * R * TOPK)
    place = start[None, :] + tl.cumsum(routed, 0) - routed  # (R_P, R_P): r's place in key region j's list
    query = tl.zeros((R_P, R_P), tl.int32) + regions[:, None]
    tl.store(ROUTED_BY + place, query.to(tl.int64), mask=routed > 0)
