"""Triton score-gather: SnapKV observation-window scores straight from vLLM's paged KV cache.

For every request ``r`` and KV head ``g`` the window queries of the group's
query heads (``G = Hq // Hkv`` of them, ``W`` queries each) are scored against
every key of the request, read ONCE through the page table:

    p[h, i, t] = exp(scale * q[h, i] . k[g, t] - lse[h, i])   (t <= pos_i, else 0)
    a[h, t]    = sum_i p            (or sum_i p**2 when square)
    mass[g, t] = sum_{h in g} sum_i p
    scores[g, t] = sum_{h in g} pool(a[h])[t]

Kernels
-------
1. ``_lse_partial_kernel`` (only when ``window_lse`` is None): one program per
   (key split, KV head, request) keeps an online (max, sum) per window query
   over its split; a tiny torch combine yields the natural-log LSE.
2. ``_window_sum_kernel``: one program per (chunk of key tiles, KV head,
   request). The group's ``G*W`` queries are loaded once as an ``[M, D]``
   tile; each ``[T, D]`` key tile is gathered through the page table once and
   hit with a single ``tl.dot`` (computed transposed, ``[T, D] x [D, M]``, so
   the per-head window sums reduce along the fast axis). The page ids of the
   whole chunk are loaded before the tile loop so that the pipeliner can keep
   key tiles in flight. It writes the unpooled per-query-head window sums to
   an fp32 scratch ``[R, Hq, S]`` and the mass ``[R, Hkv, S]`` directly.
3. ``_pool_kernel``: pooling (halo read from the scratch), GQA sum, ``-inf``
   beyond each length.

KV heads are never repeated: the GQA group shares the key tile (in shared memory).
On CPU, under ``TRITON_INTERPRET=1``, ``tl.dot`` operands are upcast to fp32
(the interpreter multiplies bf16 storage as integers); without the interpreter
a CPU call falls back to the torch reference.
"""

from __future__ import annotations

import triton
import triton.language as tl
import torch

from .reference import ScoreOutput, score_gather_reference

__all__ = ["score_gather", "ScoreOutput"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Tuning (GPU; read at call time, so a benchmark may change them). Tests pass
# block_t / tiles_per_program to exercise tile boundaries.
WINDOW_SUM_CONFIG = {"block_t": 64, "tiles_per_program": 16, "num_warps": 8, "num_stages": 4}
LSE_CONFIG = {"block_t": 64, "tiles_per_split": 16, "num_warps": 8, "num_stages": 3}
POOL_CONFIG = {"block_t": 256, "num_warps": 4}


def _interpreting() -> bool:
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:  # pragma: no cover - older triton
        import os

        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# --------------------------------------------------------------------------- #
# Shared tile helpers
# --------------------------------------------------------------------------- #
@triton.jit
def _load_group_queries(
    q_ptr, stride_qr, stride_qw, stride_qh, stride_qd,
    r, g, wl,
    G: tl.constexpr, BW: tl.constexpr, BM: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
):
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
):
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
@triton.jit
def _lse_partial_kernel(
    q_ptr, stride_qr, stride_qw, stride_qh, stride_qd,
    wl_ptr, sl_ptr,
    pt_ptr, stride_ptr,
    kv_ptr, stride_kp, stride_ks, stride_kh, stride_kd,
    pm_ptr, ps_ptr,  # [R, Hkv, NS, BM] fp32 (log2-domain max, sum)
    NS, scale_log2e,
    G: tl.constexpr, BW: tl.constexpr, BM: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BT: tl.constexpr, TPS: tl.constexpr, PAGE: tl.constexpr, DOT_F32: tl.constexpr,
):
    split = tl.program_id(0)
    g = tl.program_id(1)
    r = tl.program_id(2)
    Hkv = tl.num_programs(1)
    L = tl.load(sl_ptr + r)
    wl = tl.load(wl_ptr + r)
    q, i, row_valid = _load_group_queries(
        q_ptr, stride_qr, stride_qw, stride_qh, stride_qd, r, g, wl, G, BW, BM, D, BD
    )
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
@triton.jit
def _window_sum_kernel(
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
):
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
            mask=row_valid, other=0.0,
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
@triton.jit
def _pool_kernel(
    a_ptr, sl_ptr, scores_ptr,
    S,
    G: tl.constexpr, BG: tl.constexpr, BT: tl.constexpr, K: tl.constexpr, AVG: tl.constexpr,
):
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


# --------------------------------------------------------------------------- #
# Wrapper
# --------------------------------------------------------------------------- #
def score_gather(
    window_queries: torch.Tensor,
    window_lens: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    window_lse: torch.Tensor | None,
    pool_kernel: int,
    pool_type: str,
    square: bool,
    max_seq_len: int | None = None,
    block_t: int | None = None,
    tiles_per_program: int | None = None,
    validate: bool = False,
    out: ScoreOutput | tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ScoreOutput:
    """SnapKV window scores of R requests read from the paged KV cache.

    Args:
        window_queries: ``[R, W, Hq, D]`` bf16/fp16; rows ``i < window_lens[r]``
            are the queries of positions ``seq_lens[r] - window_lens[r] + i``;
            later rows are padding (never read).
        window_lens: ``[R]`` int32, each in ``1 .. min(W, seq_lens[r])``.
        kv_cache: ``[num_pages, 2, block_size, Hkv, D]`` (keys at index 0).
        page_table: ``[R, max_pages]`` int32.
        seq_lens: ``[R]`` int32, each ``>= 1`` (rows with 0 are allowed and
            produce only ``-inf`` / ``0``).
        scale: softmax scale (usually ``D ** -0.5``).
        window_lse: ``[R, W, Hq]`` fp32 natural-log LSE of each window query
            over its causal keys (FlashAttention's ``softmax_lse``, transposed);
            ``None`` adds a first pass over the keys that computes it.
        pool_kernel: odd pooling width (1 = none).
        pool_type: ``"max"`` or ``"avg"`` (avg divides by ``pool_kernel``).
        square: sum ``p**2`` instead of ``p`` over the window for the scores.
        max_seq_len: output length ``S``; defaults to ``max(seq_lens)`` (a sync).
        block_t / tiles_per_program: tuning knobs (keys per tile; key tiles per
            program, rounded up to a power of two); both passes. Defaults in
            ``WINDOW_SUM_CONFIG`` / ``LSE_CONFIG`` (tuned on an H100).
        validate: check the index preconditions on the host (syncs).
        out: optional preallocated ``(scores, mass)``, each contiguous fp32
            ``[R, Hkv, S]``; every element is overwritten.

    Returns:
        ``ScoreOutput(scores [R, Hkv, S] fp32, mass [R, Hkv, S] fp32)``; every
        element is written (``-inf`` / ``0`` at ``t >= seq_lens[r]``).
    """
    if pool_type not in ("max", "avg"):
        raise ValueError(f"pool_type must be 'max' or 'avg', got {pool_type!r}")
    if pool_kernel < 1 or pool_kernel % 2 != 1:
        raise ValueError(f"pool_kernel must be a positive odd integer, got {pool_kernel}")
    if window_queries.dim() != 4:
        raise ValueError("window_queries must be [R, W, Hq, D]")
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise ValueError("kv_cache must be [num_pages, 2, block_size, Hkv, D]")
    R, W, Hq, D = window_queries.shape
    _, _, PAGE, Hkv, Dk = kv_cache.shape
    if Dk != D:
        raise ValueError(f"head sizes differ: queries {D}, cache {Dk}")
    if Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    G = Hq // Hkv
    if page_table.dim() != 2 or page_table.shape[0] != R:
        raise ValueError("page_table must be [R, max_pages]")
    if max_seq_len is not None:
        S = int(max_seq_len)
    else:
        S = int(seq_lens.max().item()) if R > 0 else 0
    dev = window_queries.device
    if validate:
        sl = seq_lens.tolist()
        wl = window_lens.tolist()
        assert all(s <= S for s in sl), "seq_lens beyond max_seq_len"
        assert all((1 <= w <= min(W, s)) or s == 0 for w, s in zip(wl, sl)), "window_lens outside 1..min(W, L)"
        assert all(-(-s // PAGE) <= page_table.shape[1] for s in sl), "page_table too narrow"
        if window_lse is not None:
            assert tuple(window_lse.shape) == (R, W, Hq), "window_lse must be [R, W, Hq]"

    if out is not None:
        scores, mass = out
        for name, x in (("scores", scores), ("mass", mass)):
            if tuple(x.shape) != (R, Hkv, S) or x.dtype != torch.float32 or not x.is_contiguous():
                raise ValueError(f"out.{name} must be contiguous fp32 [{R}, {Hkv}, {S}]")
    else:
        scores = torch.empty((R, Hkv, S), dtype=torch.float32, device=dev)
        mass = torch.empty((R, Hkv, S), dtype=torch.float32, device=dev)

    if dev.type != "cuda" and not _interpreting():
        # CPU without the Triton interpreter: the torch reference (exact LSE).
        ref = score_gather_reference(
            window_queries, window_lens, kv_cache, page_table, seq_lens,
            scale=scale, pool_kernel=pool_kernel, pool_type=pool_type, square=square, max_seq_len=S,
        )
        scores.copy_(ref.scores)
        mass.copy_(ref.mass)
        return ScoreOutput(scores, mass)

    if R == 0 or S == 0:
        return ScoreOutput(scores, mass)

    window_lens = window_lens.to(device=dev, dtype=torch.int32).contiguous()
    seq_lens = seq_lens.to(device=dev, dtype=torch.int32).contiguous()
    page_table = page_table.to(torch.int32)
    interp = _interpreting()
    dot_f32 = interp  # see _dot_t
    BT = int(block_t or WINDOW_SUM_CONFIG["block_t"])
    BT_LSE = int(block_t or LSE_CONFIG["block_t"])
    for bt in (BT, BT_LSE):
        assert bt >= 16 and bt & (bt - 1) == 0, "block_t must be a power of two >= 16"
    TPP = _next_pow2(tiles_per_program or WINDOW_SUM_CONFIG["tiles_per_program"])
    TPS = _next_pow2(tiles_per_program or LSE_CONFIG["tiles_per_split"])
    BG = _next_pow2(G)
    BW = max(_next_pow2(W), _next_pow2(-(-16 // BG)))  # BM = BG * BW >= 16 for tl.dot
    BM = BG * BW
    BD = max(16, _next_pow2(D))
    scale_log2e = float(scale) * LOG2E

    esize = kv_cache.element_size()

    def _launch(cfg, bt):
        if interp:
            return {}
        nw = cfg["num_warps"] if BM * bt <= 16384 else max(8, cfg["num_warps"])
        ns = cfg["num_stages"]
        # shared memory ~ the query tile + one key tile per stage; stay under ~200 KB
        while ns > 1 and (BM + ns * bt) * BD * esize > 200 * 1024:
            ns -= 1
        return {"num_warps": nw, "num_stages": ns}

    q = window_queries
    kv = kv_cache
    ks = kv.stride()
    k_args = (kv, ks[0], ks[2], ks[3], ks[4])  # keys: kv index 0 => no offset
    q_args = (q, *q.stride())

    if window_lse is None:
        NS = triton.cdiv(S, TPS * BT_LSE)
        pm = torch.empty((R, Hkv, NS, BM), dtype=torch.float32, device=dev)
        ps = torch.empty_like(pm)
        _lse_partial_kernel[(NS, Hkv, R)](
            *q_args, window_lens, seq_lens, page_table, page_table.stride(0), *k_args,
            pm, ps, NS, scale_log2e,
            G=G, BW=BW, BM=BM, D=D, BD=BD, BT=BT_LSE, TPS=TPS, PAGE=PAGE, DOT_F32=dot_f32, **_launch(LSE_CONFIG, BT_LSE),
        )
        # combine splits (natural log); rows that saw no key stay -inf and are masked later
        lse = torch.logsumexp(pm * LN2 + torch.log(ps), dim=2)  # [R, Hkv, BM]
        lse = lse.view(R, Hkv, BG, BW)
        lse_args = (lse, lse.stride(0), lse.stride(1), lse.stride(2), lse.stride(3))
    else:
        if window_lse.dim() != 3 or window_lse.shape[0] != R or window_lse.shape[2] != Hq:
            raise ValueError("window_lse must be [R, W, Hq]")
        lse = window_lse.to(torch.float32)
        sr, sw, sh = lse.stride()
        lse_args = (lse, sr, G * sh, sh, sw)

    a = torch.empty((R, Hq, S), dtype=torch.float32, device=dev)
    n_chunks = triton.cdiv(S, BT * TPP)
    _window_sum_kernel[(n_chunks, Hkv, R)](
        *q_args, window_lens, seq_lens, page_table, page_table.stride(0), *k_args,
        *lse_args, a, mass, S, scale_log2e,
        G=G, BG=BG, BW=BW, BM=BM, D=D, BD=BD, BT=BT, TPP=TPP, PAGE=PAGE,
        SQUARE=bool(square), DOT_F32=dot_f32, **_launch(WINDOW_SUM_CONFIG, BT),
    )
    PBT = POOL_CONFIG["block_t"] if not interp else max(BT, 64)
    _pool_kernel[(triton.cdiv(S, PBT), Hkv, R)](
        a, seq_lens, scores, S,
        G=G, BG=BG, BT=PBT, K=int(pool_kernel), AVG=(pool_type == "avg"),
        **({} if interp else {"num_warps": POOL_CONFIG["num_warps"]}),
    )
    return ScoreOutput(scores, mass)
