"""In-place compaction of survivors in vLLM's paged KV cache, page copies, and selection.

``compact_kv_``: for each row ``b`` and KV head ``g``, logical slot ``i <
keep_counts[b]`` receives the key and value (head ``g`` only) of logical token
``keep_idx[b, g, i]``. One program per (row, KV head, K-or-V) walks its
survivors in order, ``BK`` at a time: load the chunk's sources, CTA barrier,
store to the destinations. Since ``keep_idx`` is strictly ascending,
``keep_idx[i] >= i``: a chunk only reads positions ``>=`` its own first
destination, which no earlier chunk wrote, so the in-place result equals the
out-of-place one (``reference.compact_reference``). Programs touch disjoint
memory (own head, own K/V half, own row's pages) provided rows do not share
pages (``validate=True`` checks it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import forced_keep_mask, interpreting
from .reference import compact_reference, copy_pages_reference

__all__ = ["compact_kv_", "copy_pages_", "select_keep_indices", "KEEP_IDX_SENTINEL"]

KEEP_IDX_SENTINEL = 2**31 - 1  # padding of keep_idx beyond keep_counts[b]

# Fixed launch configurations, not autotuned (unlike score_gather's kernels):
# * compaction works in place and is not idempotent (a second run moves the
#   already-compacted survivors again), and autotune re-runs the kernel while it
#   times configs; restore_value would clone the whole KV pool for each timing.
#   block_k (default below) is swept by bench/kernels_bench.py instead.
# * copy_pages_ is idempotent but a plain copy at ~0.9 of copy bandwidth
#   (bench/KERNELS-NOTES.md): nothing to gain.
DEFAULT_BLOCK_K = 128  # survivors per chunk
DEFAULT_COPY_BLOCK = 4096  # elements per program of copy_pages_


# --------------------------------------------------------------------------- #
# Compaction
# --------------------------------------------------------------------------- #
# Strides that vary with the batch (pages per row, kept tokens) are not specialized:
# one compiled variant serves every batch, so serving never compiles (warm-up does).
@triton.jit(do_not_specialize=["stride_ptb", "stride_ib", "stride_ig"])
def _compact_kernel(
    kv_ptr, stride_kp, stride_kv, stride_ks, stride_kh, stride_kd,
    pt_ptr, stride_ptb,
    idx_ptr, stride_ib, stride_ig,
    cnt_ptr,
    PAGE: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    g = tl.program_id(1)
    which = tl.program_id(2)  # 0 = keys, 1 = values
    n = tl.load(cnt_ptr + b)
    b64 = b.to(tl.int64)
    base = kv_ptr + which.to(tl.int64) * stride_kv + g.to(tl.int64) * stride_kh
    pt_row = pt_ptr + b64 * stride_ptb
    idx_row = idx_ptr + b64 * stride_ib + g.to(tl.int64) * stride_ig
    d = tl.arange(0, BD)
    dmask = d < D
    doff = d.to(tl.int64) * stride_kd
    for c in range(0, n, BK):
        i = c + tl.arange(0, BK)
        valid = i < n
        src = tl.load(idx_row + i, mask=valid, other=0)
        move = valid & (src != i)  # survivors already in place are skipped
        spage = tl.load(pt_row + src // PAGE, mask=move, other=0).to(tl.int64)
        dpage = tl.load(pt_row + i // PAGE, mask=move, other=0).to(tl.int64)
        soff = spage * stride_kp + (src % PAGE).to(tl.int64) * stride_ks
        doff_row = dpage * stride_kp + (i % PAGE).to(tl.int64) * stride_ks
        m2 = move[:, None] & dmask[None, :]
        vals = tl.load(base + soff[:, None] + doff[None, :], mask=m2)
        # Every source of this chunk is read before any destination of it is
        # written (sources and destinations of one chunk may overlap).
        tl.debug_barrier()
        tl.store(base + doff_row[:, None] + doff[None, :], vals, mask=m2)
        # No second barrier needed: later chunks read only positions >= their
        # first destination (> every destination of this chunk).


def compact_kv_(
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    keep_idx: torch.Tensor,
    keep_counts: torch.Tensor,
    *,
    seq_lens: torch.Tensor | None = None,
    validate: bool = False,
    block_k: int | None = None,
) -> None:
    """Compact survivors in place (see module doc).

    Args:
        kv_cache: ``[num_pages, 2, block_size, Hkv, D]`` (modified in place).
        page_table: ``[B, max_pages]`` int32.
        keep_idx: ``[B, Hkv, K_max]`` int32/int64; row ``keep_idx[b, g, :keep_counts[b]]``
            must be strictly ascending and ``< seq_lens[b]``; entries beyond are ignored.
        keep_counts: ``[B]`` int32, each ``<= K_max``.
        seq_lens: optional, only used by ``validate``.
        validate: check the preconditions on the host (syncs): ascending, in
            range, page table wide enough, no page shared between rows.
        block_k: survivors per chunk (tuning).
    """
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise ValueError("kv_cache must be [num_pages, 2, block_size, Hkv, D]")
    B, Hkv, K_max = keep_idx.shape
    _, _, PAGE, Hkv_c, D = kv_cache.shape
    if Hkv != Hkv_c:
        raise ValueError(f"keep_idx has {Hkv} KV heads, cache {Hkv_c}")
    if page_table.dim() != 2 or page_table.shape[0] != B or keep_counts.shape[0] != B:
        raise ValueError("page_table must be [B, max_pages] and keep_counts [B]")
    if validate:
        _validate_compaction(kv_cache, page_table, keep_idx, keep_counts, seq_lens)
    if B == 0 or K_max == 0:
        return
    dev = kv_cache.device
    if dev.type != "cuda" and not interpreting():
        kv_cache.copy_(compact_reference(kv_cache, page_table, keep_idx, keep_counts))
        return
    BK = int(block_k or DEFAULT_BLOCK_K)
    BD = max(16, triton.next_power_of_2(D))
    page_table = page_table.to(torch.int32)
    keep_counts = keep_counts.to(device=dev, dtype=torch.int32).contiguous()
    ks = kv_cache.stride()
    launch = {} if interpreting() else {"num_warps": 4, "num_stages": 2}
    _compact_kernel[(B, Hkv, 2)](
        kv_cache, ks[0], ks[1], ks[2], ks[3], ks[4],
        page_table, page_table.stride(0),
        keep_idx, keep_idx.stride(0), keep_idx.stride(1),
        keep_counts,
        PAGE=PAGE, D=D, BD=BD, BK=BK, **launch,
    )  # fmt: skip


def _validate_compaction(kv_cache, page_table, keep_idx, keep_counts, seq_lens):
    B, Hkv, K_max = keep_idx.shape
    PAGE = kv_cache.shape[2]
    kc = [int(x) for x in keep_counts.tolist()]
    sl = [int(x) for x in seq_lens.tolist()] if seq_lens is not None else None
    owner: dict[int, int] = {}
    for b in range(B):
        n = kc[b]
        assert 0 <= n <= K_max, f"row {b}: keep_counts {n} outside [0, {K_max}]"
        if n == 0:
            continue
        rows = keep_idx[b, :, :n].to(torch.long)
        assert int(rows.min()) >= 0, f"row {b}: negative keep_idx"
        if n > 1:
            assert bool((rows[:, 1:] > rows[:, :-1]).all()), f"row {b}: keep_idx not strictly ascending"
        hi = int(rows.max())
        limit = sl[b] if sl is not None else page_table.shape[1] * PAGE
        assert hi < limit, f"row {b}: keep_idx {hi} beyond the sequence ({limit})"
        n_pages = hi // PAGE + 1
        assert n_pages <= page_table.shape[1], f"row {b}: page_table too narrow"
        for p in page_table[b, :n_pages].tolist():
            assert 0 <= p < kv_cache.shape[0], f"row {b}: page id {p} out of range"
            assert owner.setdefault(p, b) == b, f"page {p} used by rows {owner[p]} and {b}"


# --------------------------------------------------------------------------- #
# Page copies
# --------------------------------------------------------------------------- #
@triton.jit
def _copy_pages_kernel(src_ptr, dst_ptr, kv_ptr, page_numel, BLOCK: tl.constexpr):
    pair = tl.program_id(0)
    blk = tl.program_id(1)
    s = tl.load(src_ptr + pair).to(tl.int64)
    d = tl.load(dst_ptr + pair).to(tl.int64)
    offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < page_numel
    x = tl.load(kv_ptr + s * page_numel + offs, mask=m)
    tl.store(kv_ptr + d * page_numel + offs, x, mask=m)


def copy_pages_(
    kv_cache: torch.Tensor, src_pages: torch.Tensor, dst_pages: torch.Tensor, *, validate: bool = False
) -> None:
    """``kv_cache[dst_pages[i]] = kv_cache[src_pages[i]]`` in place (src and dst sets disjoint).

    ``kv_cache`` is any tensor whose first dim indexes pages and whose pages are
    contiguous (e.g. ``[num_pages, 2, block_size, Hkv, D]``).
    """
    src = src_pages.reshape(-1)
    dst = dst_pages.reshape(-1)
    if src.numel() != dst.numel():
        raise ValueError("src_pages and dst_pages differ in length")
    if validate:
        s, d = set(src.tolist()), set(dst.tolist())
        assert len(d) == dst.numel(), "duplicate destination pages"
        assert not (s & d), "src and dst pages overlap"
        assert all(0 <= p < kv_cache.shape[0] for p in s | d), "page id out of range"
    n = src.numel()
    if n == 0:
        return
    page_numel = kv_cache[0].numel()
    if kv_cache.stride(0) != page_numel or not kv_cache[0].is_contiguous():
        raise ValueError("copy_pages_ needs contiguous pages")
    dev = kv_cache.device
    if dev.type != "cuda" and not interpreting():
        kv_cache.copy_(copy_pages_reference(kv_cache, src, dst))
        return
    if page_numel == 0:
        return
    src = src.to(device=dev).contiguous()
    dst = dst.to(device=dev).contiguous()
    BLOCK = min(DEFAULT_COPY_BLOCK, triton.next_power_of_2(page_numel))
    launch = {} if interpreting() else {"num_warps": 4}
    _copy_pages_kernel[(n, triton.cdiv(page_numel, BLOCK))](src, dst, kv_cache, page_numel, BLOCK=BLOCK, **launch)


# --------------------------------------------------------------------------- #
# Selection (torch)
# --------------------------------------------------------------------------- #
def select_keep_indices(
    scores: torch.Tensor,
    seq_lens: torch.Tensor,
    keep_counts: torch.Tensor,
    num_sinks: int,
    num_recent: int,
    *,
    max_keep: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Per row and KV head, the ``keep_counts[b]`` best positions, sorted ascending.

    Args:
        scores: ``[B, Hkv, S]`` fp32 (positions ``>= seq_lens[b]`` ignored).
        seq_lens: ``[B]``; keep_counts: ``[B]`` with ``forced <= keep_counts[b] <= seq_lens[b]``
            where ``forced = min(L, num_sinks + num_recent)`` (checked when ``validate``).
        num_sinks / num_recent: positions ``< num_sinks`` and ``>= L - num_recent``
            are always kept.
        max_keep: ``K_max`` of the output (defaults to ``max(keep_counts)``, a sync).

    Returns:
        ``keep_idx [B, Hkv, K_max]`` int32, each row ascending, padded beyond
        ``keep_counts[b]`` with ``KEEP_IDX_SENTINEL``. Ties go to the lower index.
    """
    B, Hkv, S = scores.shape
    dev = scores.device
    sl = torch.as_tensor(seq_lens, device=dev).to(torch.long)
    kc = torch.as_tensor(keep_counts, device=dev).to(torch.long)
    if validate:
        slh, kch = sl.tolist(), kc.tolist()
        for b in range(B):
            L, k = slh[b], kch[b]
            assert L <= S, f"row {b}: seq_len {L} > scores length {S}"
            forced = min(L, max(0, num_sinks) + max(0, num_recent))
            assert forced <= k <= L, f"row {b}: keep {k} outside [{forced}, {L}]"
    K_max = int(max_keep) if max_keep is not None else (int(kc.max()) if B else 0)
    if K_max == 0 or B == 0:
        return torch.full((B, Hkv, K_max), KEEP_IDX_SENTINEL, dtype=torch.int32, device=dev)
    t = torch.arange(S, device=dev)
    valid = t[None, :] < sl[:, None]  # [B, S]
    forced = forced_keep_mask(sl, S, num_sinks, num_recent)
    fmax = torch.finfo(torch.float32).max
    key = torch.nan_to_num(scores.to(torch.float32), nan=float("-inf"), posinf=fmax)
    key = key.masked_fill(forced[:, None, :], float("inf"))
    key = key.masked_fill(~valid[:, None, :], float("-inf"))
    # stable descending sort: equal keys keep ascending index order (ties -> lower index);
    # invalid positions (-inf) sort after valid ones of equal key since they have higher indices.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :K_max]
    taken = torch.arange(K_max, device=dev)[None, None, :] < kc[:, None, None]
    order = torch.where(taken, order, torch.full_like(order, KEEP_IDX_SENTINEL))
    return torch.sort(order, dim=-1).values.to(torch.int32)
