"""Triton kernels of ``score_gather`` (host side, math and contract: kernels/score_gather.py).

1. ``lse_partial_kernel`` (only when ``window_lse`` is None): one program per
   (key split, KV head, request) keeps an online (max, sum) per window query
   over its split; a tiny torch combine yields the natural-log LSE.
2. ``window_sum_kernel``: one program per (chunk of key tiles, KV head,
   request). The group's ``G*W`` queries are loaded once as an ``[M, D]``
   tile; each ``[T, D]`` key tile is gathered through the page table once and
   hit with a single ``tl.dot`` (computed transposed, ``[T, D] x [D, M]``, so
   the per-head window sums reduce along the fast axis). The page ids of the
   whole chunk are loaded before the tile loop so that the pipeliner can keep
   key tiles in flight. It writes the unpooled per-query-head window sums to
   an fp32 scratch ``[R, Hq, S]`` and the mass ``[R, Hkv, S]`` directly.
3. ``pool_gqa_kernel``: pooling (halo read from the scratch), GQA sum, ``-inf``
   beyond each length.

KV heads are never repeated: the GQA group shares the key tile (in shared memory).
On CPU, under ``TRITON_INTERPRET=1``, ``tl.dot`` operands are upcast to fp32
(the interpreter multiplies bf16 storage as integers).

The three kernels are ``@triton.autotune`` d over the configs of
``score_gather_configs`` (keys, candidates, pruning: see there). Callers that
fix the tiling launch the jitted kernel (``kernel.fn``) directly. Kernel
signatures keep their arguments grouped (pointer with its strides): ``# fmt: skip``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import bench_when_tuning
from .score_gather_configs import (
    LSE_CONFIGS,
    LSE_KEY,
    POOL_CONFIGS,
    POOL_KEY,
    WINDOW_SUM_CONFIGS,
    WINDOW_SUM_KEY,
    prune_lse,
    prune_pool,
    prune_window_sum,
)

__all__ = ["LN2", "LOG2E", "lse_partial_kernel", "pool_gqa_kernel", "window_sum_kernel"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# --------------------------------------------------------------------------- #
# Shared tile helpers
# --------------------------------------------------------------------------- #
@triton.jit
def _load_group_queries(
    q_ptr, stride_qr, stride_qw, stride_qh, stride_qd,
    r, g, wl,
    G: tl.constexpr, BW: tl.constexpr, BM: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """Queries of the group's heads as an [BM, BD] tile; row m = j * BW + i (head g*G+j, window row i)."""
    m = tl.arange(0, BM)
    j = m // BW
    i = m % BW
    d = tl.arange(0, BD)
    row_valid = (j < G) & (i < wl)
    h = g * G + j
    ptrs = q_ptr + r.to(tl.int64) * stride_qr + i[:, None] * stride_qw + h[:, None] * stride_qh + d[None, :] * stride_qd
    q = tl.load(ptrs, mask=row_valid[:, None] & (d[None, :] < D), other=0.0)
    return q, i, row_valid


@triton.jit
def _load_chunk_pages(pt_row_ptr, chunk_start, L, NT: tl.constexpr, BT: tl.constexpr, PAGE: tl.constexpr):
    """Page ids of the NT key tiles starting at chunk_start, as [NT, BT] int32 (0 beyond L).

    Loaded once before the tile loop so that the key addresses inside the loop
    depend on no load of the loop: Triton's pipeliner can then prefetch the key
    tiles (cp.async, num_stages - 1 tiles ahead) instead of exposing a
    page-table -> key dependent-load chain on every tile.
    """
    tok = chunk_start + tl.arange(0, NT)[:, None] * BT + tl.arange(0, BT)[None, :]
    return tl.load(pt_row_ptr + tok // PAGE, mask=tok < L, other=0)


@triton.jit
def _load_key_tile(
    kv_ptr, stride_kp, stride_ks, stride_kh, stride_kd,
    pages, tt, t, L, g,
    NT: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """Keys of logical tokens ``t`` ([BT], tile ``tt`` of the chunk) of KV head g: [BT, BD]."""
    tv = t < L
    page = tl.sum(tl.where(tl.arange(0, NT)[:, None] == tt, pages, 0), axis=0).to(tl.int64)
    off = page * stride_kp + (t % PAGE).to(tl.int64) * stride_ks + g * stride_kh
    d = tl.arange(0, BD)
    k = tl.load(kv_ptr + off[:, None] + d[None, :] * stride_kd, mask=tv[:, None] & (d[None, :] < D), other=0.0)
    return k


@triton.jit
def _dot_t(a, b, DOT_F32: tl.constexpr):
    """a @ b^T (logits Q K^T, or K Q^T for the transposed tile).

    The CPU interpreter mis-handles bf16 tl.dot (it multiplies the raw uint16
    storage); DOT_F32 upcasts there. Products of bf16/fp16 values are exact in
    fp32, so this matches the GPU's fp32-accumulating bf16 MMA.
    """
    if DOT_F32:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)))
    else:
        return tl.dot(a, tl.trans(b))


# --------------------------------------------------------------------------- #
# Kernel 1 (optional): LSE partials
# --------------------------------------------------------------------------- #
@triton.autotune(
    configs=LSE_CONFIGS,
    key=LSE_KEY,
    prune_configs_by={"early_config_prune": prune_lse},
    do_bench=bench_when_tuning,
)
@triton.jit(do_not_specialize=["stride_ptr", "NS"])  # vary per batch: one compiled variant for all
def lse_partial_kernel(
    q_ptr, stride_qr, stride_qw, stride_qh, stride_qd,
    wl_ptr, sl_ptr,
    pt_ptr, stride_ptr,
    kv_ptr, stride_kp, stride_ks, stride_kh, stride_kd,
    pm_ptr, ps_ptr,  # [R, Hkv, NS, BM] fp32 (log2-domain max, sum)
    NS, scale_log2e,
    G: tl.constexpr, BW: tl.constexpr, BM: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BT: tl.constexpr, TPS: tl.constexpr, PAGE: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    g = tl.program_id(1)
    r = tl.program_id(2)
    Hkv = tl.num_programs(1)
    L = tl.load(sl_ptr + r)
    wl = tl.load(wl_ptr + r)
    q, i, row_valid = _load_group_queries(q_ptr, stride_qr, stride_qw, stride_qh, stride_qd, r, g, wl, G, BW, BM, D, BD)
    pos = L - wl + i  # [BM] causal limit of each query row
    free_end = L - wl + 1  # keys < free_end are visible to every window query
    pt_row_ptr = pt_ptr + r.to(tl.int64) * stride_ptr
    m_i = tl.full([BM], float("-inf"), tl.float32)
    s_i = tl.zeros([BM], tl.float32)
    start = split * (TPS * BT)
    n_tiles = tl.minimum(tl.cdiv(L - start, BT), TPS)  # <= 0 when the split starts beyond L
    pages = _load_chunk_pages(pt_row_ptr, start, L, TPS, BT, PAGE)
    for tt in range(0, n_tiles):
        t0 = start + tt * BT
        t = t0 + tl.arange(0, BT)
        k = _load_key_tile(kv_ptr, stride_kp, stride_ks, stride_kh, stride_kd, pages, tt, t, L, g, TPS, PAGE, D, BD)
        x = _dot_t(q, k, DOT_F32) * scale_log2e
        if t0 + BT > free_end:  # tile reaches the window: causal mask (also masks t >= L)
            x = tl.where(t[None, :] <= pos[:, None], x, float("-inf"))
        # (padding rows hold garbage sums; they are never used)
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), axis=1)
        m_i = m_new
    mo = tl.arange(0, BM)
    base = ((r.to(tl.int64) * Hkv + g) * NS + split) * BM
    tl.store(pm_ptr + base + mo, m_i)
    tl.store(ps_ptr + base + mo, s_i)


# --------------------------------------------------------------------------- #
# Kernel 2: window sums (scratch) + mass
# --------------------------------------------------------------------------- #
@triton.autotune(
    configs=WINDOW_SUM_CONFIGS,
    key=WINDOW_SUM_KEY,
    prune_configs_by={"early_config_prune": prune_window_sum},
    do_bench=bench_when_tuning,
)
@triton.jit(do_not_specialize=["stride_ptr", "S"])  # vary per batch: one compiled variant for all
def window_sum_kernel(
    q_ptr, stride_qr, stride_qw, stride_qh, stride_qd,
    wl_ptr, sl_ptr,
    pt_ptr, stride_ptr,
    kv_ptr, stride_kp, stride_ks, stride_kh, stride_kd,
    lse_ptr, stride_lr, stride_lg, stride_lj, stride_li,  # natural-log LSE, addressed (r, g, j, i)
    a_ptr,  # scratch [R, Hq, S] fp32
    mass_ptr,  # [R, Hkv, S] fp32
    S, scale_log2e,
    G: tl.constexpr, BG: tl.constexpr, BW: tl.constexpr, BM: tl.constexpr,
    D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, TPP: tl.constexpr,
    PAGE: tl.constexpr, SQUARE: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """Logits are computed transposed, [BT keys, BM query rows] = K @ Q^T, so that
    the per-head window sums reduce along the fast (in-thread / in-quad) axis."""
    chunk = tl.program_id(0)
    g = tl.program_id(1)
    r = tl.program_id(2)
    Hkv = tl.num_programs(1)
    Hq = Hkv * G
    L = tl.load(sl_ptr + r)
    wl = tl.load(wl_ptr + r)
    r64 = r.to(tl.int64)
    mass_row = mass_ptr + (r64 * Hkv + g) * S
    jj = tl.arange(0, BG)
    a_cols = a_ptr + (r64 * Hq + g * G + jj).to(tl.int64)[None, :] * S  # [1, BG]
    chunk_start = chunk * (BT * TPP)
    if chunk_start < L:
        q, i, row_valid = _load_group_queries(
            q_ptr, stride_qr, stride_qw, stride_qh, stride_qd, r, g, wl, G, BW, BM, D, BD
        )
        j = tl.arange(0, BM) // BW
        lse = tl.load(
            lse_ptr + r64 * stride_lr + g * stride_lg + j * stride_lj + i * stride_li,
            mask=row_valid,
            other=0.0,
        )
        # log2 domain; padding rows get +inf so that their p is exactly 0 without a mask
        lse2 = tl.where(row_valid, lse * 1.4426950408889634, float("inf"))
        pos = L - wl + i
        free_end = L - wl + 1
        pt_row_ptr = pt_ptr + r64 * stride_ptr
        pages = _load_chunk_pages(pt_row_ptr, chunk_start, L, TPP, BT, PAGE)
        for tt in range(TPP):
            t0 = chunk_start + tt * BT
            t = t0 + tl.arange(0, BT)
            k = _load_key_tile(kv_ptr, stride_kp, stride_ks, stride_kh, stride_kd, pages, tt, t, L, g, TPP, PAGE, D, BD)
            x = _dot_t(k, q, DOT_F32) * scale_log2e - lse2[None, :]  # [BT, BM]
            if t0 + BT > free_end:  # tile reaches the window: causal mask (also masks t >= L)
                x = tl.where(t[:, None] <= pos[None, :], x, float("-inf"))
            p = tl.exp2(x)
            p3 = tl.reshape(p, (BT, BG, BW))
            ph = tl.sum(p3, axis=2)  # [BT, BG] window sums per query head
            mass = tl.sum(ph, axis=1)  # [BT]
            if SQUARE:
                ah = tl.sum(p3 * p3, axis=2)
            else:
                ah = ph
            tl.store(mass_row + t, mass, mask=t < S)
            tl.store(a_cols + t[:, None], ah, mask=(t[:, None] < L) & (jj[None, :] < G))
    else:
        for tt in range(TPP):
            t = chunk_start + tt * BT + tl.arange(0, BT)
            tl.store(mass_row + t, tl.zeros([BT], tl.float32), mask=t < S)


# --------------------------------------------------------------------------- #
# Kernel 3: pooling + GQA sum
# --------------------------------------------------------------------------- #
@triton.autotune(
    configs=POOL_CONFIGS,
    key=POOL_KEY,
    prune_configs_by={"early_config_prune": prune_pool},
    do_bench=bench_when_tuning,
)
@triton.jit(do_not_specialize=["S"])  # varies per batch: one compiled variant for all
def pool_gqa_kernel(
    a_ptr, sl_ptr, scores_ptr,
    S,
    G: tl.constexpr, BG: tl.constexpr, BT: tl.constexpr, K: tl.constexpr, AVG: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    g = tl.program_id(1)
    r = tl.program_id(2)
    Hkv = tl.num_programs(1)
    Hq = Hkv * G
    r64 = r.to(tl.int64)
    L = tl.load(sl_ptr + r)
    t = tile * BT + tl.arange(0, BT)
    jj = tl.arange(0, BG)
    jv = jj < G
    rows = a_ptr + (r64 * Hq + g * G + jj).to(tl.int64)[:, None] * S  # [BG, 1]
    HALF: tl.constexpr = K // 2
    if AVG:
        acc = tl.zeros([BG, BT], tl.float32)
    else:
        acc = tl.full([BG, BT], float("-inf"), tl.float32)
    for o in tl.static_range(K):
        ts = t + (o - HALF)
        m = jv[:, None] & ((ts >= 0) & (ts < L))[None, :]
        if AVG:
            acc += tl.load(rows + ts[None, :], mask=m, other=0.0)
        else:
            acc = tl.maximum(acc, tl.load(rows + ts[None, :], mask=m, other=float("-inf")))
    if AVG:
        acc = acc * (1.0 / K)
    acc = tl.where(jv[:, None], acc, 0.0)
    score = tl.sum(acc, axis=0)
    score = tl.where(t < L, score, float("-inf"))
    tl.store(scores_ptr + (r64 * Hkv + g) * S + t, score, mask=t < S)
