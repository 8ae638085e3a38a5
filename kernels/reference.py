"""Plain-torch references for the KV-compression kernels.

These are the oracle the Triton kernels are tested against, and the CPU
implementation the product falls back to. They favour clarity over speed and
compute in float64 (scores) or exact copies (compaction).

Cache layout (vLLM 0.25.1 FlashAttention backend): one layer's cache is
``kv_cache[num_pages, 2, block_size, num_kv_heads, head_size]`` (index 0 of
dim 1 = keys, 1 = values). Logical token ``t`` of a request lives at page
``page_table[r, t // block_size]``, slot ``t % block_size``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .common import forced_keep_mask

__all__ = [
    "ScoreOutput",
    "gather_kv",
    "gather_keys",
    "gather_values",
    "window_scores_reference",
    "window_lse_reference",
    "score_gather_reference",
    "select_keep_indices_reference",
    "select_keep_indices_batched_reference",
    "compact_reference",
    "copy_pages_reference",
]


class ScoreOutput(NamedTuple):
    """Per-position eviction scores and raw attention mass.

    scores: [R, Hkv, S] fp32, pooled + GQA-summed window attention (``-inf``
        beyond each request's length).
    mass:   [R, Hkv, S] fp32, unpooled, unsquared window-summed probabilities
        summed over the group's query heads (``0`` beyond the length).
    """

    scores: torch.Tensor
    mass: torch.Tensor


# --------------------------------------------------------------------------- #
# Gathering tokens through a page table
# --------------------------------------------------------------------------- #
def _token_locations(page_table_row: torch.Tensor, seq_len: int, block_size: int):
    t = torch.arange(seq_len, device=page_table_row.device)
    pages = page_table_row.to(torch.long)[t // block_size]
    slots = t % block_size
    return pages, slots


def gather_kv(kv_cache: torch.Tensor, page_table_row: torch.Tensor, seq_len: int, kv: int = 0) -> torch.Tensor:
    """Logical tokens ``[0, seq_len)`` of one request: ``[seq_len, Hkv, D]``.

    ``kv`` = 0 for keys, 1 for values.
    """
    assert kv_cache.dim() == 5 and kv_cache.shape[1] == 2, "kv_cache must be [pages, 2, block, Hkv, D]"
    assert kv in (0, 1)
    block_size = kv_cache.shape[2]
    pages, slots = _token_locations(page_table_row, int(seq_len), block_size)
    return kv_cache[pages, kv, slots]


def gather_keys(kv_cache: torch.Tensor, page_table_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Keys of logical tokens ``[0, seq_len)``: ``[seq_len, Hkv, D]``."""
    return gather_kv(kv_cache, page_table_row, seq_len, kv=0)


def gather_values(kv_cache: torch.Tensor, page_table_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Values of logical tokens ``[0, seq_len)``: ``[seq_len, Hkv, D]``."""
    return gather_kv(kv_cache, page_table_row, seq_len, kv=1)


# --------------------------------------------------------------------------- #
# Observation-window scores
# --------------------------------------------------------------------------- #
def _window_logits(window_queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Masked logits ``[Hq, W, P]`` float64 (``-inf`` on non-causal keys)."""
    W, Hq, D = window_queries.shape
    P, Hkv, Dk = keys.shape
    assert D == Dk, "head sizes differ"
    assert Hq % Hkv == 0, "Hq must be a multiple of Hkv"
    assert 1 <= W <= P, "window must hold 1..P queries"
    G = Hq // Hkv
    q = window_queries.to(torch.float64)
    k = keys.to(torch.float64)
    # query head h uses KV head h // G
    k_h = k.permute(1, 0, 2).repeat_interleave(G, dim=0)  # [Hq, P, D]
    logits = scale * torch.einsum("whd,hpd->hwp", q, k_h)  # [Hq, W, P]
    pos = P - W + torch.arange(W, device=q.device)  # query positions
    t = torch.arange(P, device=q.device)
    causal = t[None, :] <= pos[:, None]  # [W, P]
    return logits.masked_fill(~causal[None], float("-inf"))


def window_lse_reference(window_queries: torch.Tensor, keys: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Natural-log logsumexp of each window query over its causal keys: ``[W, Hq]`` fp32.

    This is what FlashAttention returns as ``softmax_lse`` (transposed).
    """
    logits = _window_logits(window_queries, keys, scale)
    return torch.logsumexp(logits, dim=-1).transpose(0, 1).to(torch.float32).contiguous()


def _pool1d(a: torch.Tensor, pool_kernel: int, pool_type: str) -> torch.Tensor:
    """Stride-1 centred pooling over the last dim of ``a`` [H, P] (valid positions only)."""
    if pool_kernel == 1:
        return a
    assert pool_kernel % 2 == 1 and pool_kernel > 1, "pool_kernel must be odd"
    pad = pool_kernel // 2
    x = a.unsqueeze(1)  # [H, 1, P]
    if pool_type == "max":
        # max_pool1d pads with -inf: max over the valid part of the window
        out = F.max_pool1d(x, kernel_size=pool_kernel, stride=1, padding=pad)
    elif pool_type == "avg":
        out = F.avg_pool1d(x, kernel_size=pool_kernel, stride=1, padding=pad, count_include_pad=True)
    else:
        raise ValueError(f"pool_type must be 'max' or 'avg', got {pool_type!r}")
    return out.squeeze(1)


def window_scores_reference(
    window_queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    scale: float,
    pool_kernel: int,
    pool_type: str,
    square: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SnapKV-style observation-window scores of one request.

    window_queries: ``[W, Hq, D]``, the queries of positions ``P-W .. P-1``.
    keys: ``[P, Hkv, D]``.

    Returns ``(scores [Hkv, P] fp32, mass [Hkv, P] fp32)``:

    * ``a_h[t] = sum_i softmax_i(scale * q_i . k)[t]`` over causal keys
      (``probs ** 2`` summed when ``square``);
    * ``scores[g] = sum_{h in group g} pool(a_h)`` (max or avg, odd kernel,
      centred, valid positions only; avg divides by the kernel size);
    * ``mass[g] = sum_{h in group g} sum_i probs[h, i]`` (unpooled, unsquared).
    """
    if pool_type not in ("max", "avg"):
        raise ValueError(f"pool_type must be 'max' or 'avg', got {pool_type!r}")
    W, Hq, _ = window_queries.shape
    P, Hkv, _ = keys.shape
    G = Hq // Hkv
    logits = _window_logits(window_queries, keys, scale)
    probs = torch.softmax(logits, dim=-1)  # [Hq, W, P]; non-causal entries are exactly 0
    mass_h = probs.sum(dim=1)  # [Hq, P]
    a = (probs * probs).sum(dim=1) if square else mass_h
    pooled = _pool1d(a, pool_kernel, pool_type)  # [Hq, P]
    scores = pooled.reshape(Hkv, G, P).sum(dim=1)
    mass = mass_h.reshape(Hkv, G, P).sum(dim=1)
    return scores.to(torch.float32), mass.to(torch.float32)


def score_gather_reference(
    window_queries: torch.Tensor,
    window_lens: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    pool_kernel: int,
    pool_type: str,
    square: bool,
    max_seq_len: int | None = None,
) -> ScoreOutput:
    """Batched reference with the same contract as ``score_gather``.

    (``window_lse`` is not needed: the reference always normalises exactly.)
    """
    R = window_queries.shape[0]
    Hkv = kv_cache.shape[3]
    wl = [int(x) for x in window_lens.tolist()]
    sl = [int(x) for x in seq_lens.tolist()]
    S = int(max_seq_len) if max_seq_len is not None else max(sl)
    dev = window_queries.device
    scores = torch.full((R, Hkv, S), float("-inf"), dtype=torch.float32, device=dev)
    mass = torch.zeros((R, Hkv, S), dtype=torch.float32, device=dev)
    for r in range(R):
        L, w = sl[r], wl[r]
        if L == 0:
            continue
        keys = gather_keys(kv_cache, page_table[r], L)
        s, m = window_scores_reference(
            window_queries[r, :w], keys, scale=scale, pool_kernel=pool_kernel, pool_type=pool_type, square=square
        )
        scores[r, :, :L] = s
        mass[r, :, :L] = m
    return ScoreOutput(scores, mass)


# --------------------------------------------------------------------------- #
# Selection
# --------------------------------------------------------------------------- #
def select_keep_indices_reference(scores: torch.Tensor, keep: int, num_sinks: int, num_recent: int) -> torch.Tensor:
    """Per KV head, the ``keep`` best positions of ``scores`` [Hkv, P], sorted ascending (int64).

    Positions ``< num_sinks`` and ``>= P - num_recent`` are always kept (asserts
    that ``keep`` is at least their count); ties go to the lower index;
    ``keep == P`` keeps everything.
    """
    Hkv, P = scores.shape
    keep = int(keep)
    assert 0 <= keep <= P, f"keep={keep} outside [0, {P}]"
    forced = forced_keep_mask(torch.tensor([P], device=scores.device), P, num_sinks, num_recent)[0]
    n_forced = int(forced.sum())
    assert keep >= n_forced, f"keep={keep} < {n_forced} forced sink/recent positions"
    out = torch.empty((Hkv, keep), dtype=torch.int64, device=scores.device)
    for g in range(Hkv):
        s = scores[g].to(torch.float64).tolist()
        f = forced.tolist()
        # priority: forced first, then higher score, then lower index
        order = sorted(range(P), key=lambda t: (0 if f[t] else 1, -s[t] if not math.isnan(s[t]) else math.inf, t))
        out[g] = torch.tensor(sorted(order[:keep]), dtype=torch.int64)
    return out


def select_keep_indices_batched_reference(
    scores: torch.Tensor, seq_lens, keep_counts, num_sinks: int, num_recent: int, sentinel: int = 2**31 - 1
) -> torch.Tensor:
    """Row-by-row reference of ``select_keep_indices``: ``[B, Hkv, K_max]`` int32, padded with ``sentinel``."""
    B, Hkv, _ = scores.shape
    sl = [int(x) for x in torch.as_tensor(seq_lens).tolist()]
    kc = [int(x) for x in torch.as_tensor(keep_counts).tolist()]
    k_max = max(kc) if kc else 0
    out = torch.full((B, Hkv, k_max), sentinel, dtype=torch.int32, device=scores.device)
    for b in range(B):
        idx = select_keep_indices_reference(scores[b, :, : sl[b]], kc[b], num_sinks, num_recent)
        out[b, :, : kc[b]] = idx.to(torch.int32)
    return out


# --------------------------------------------------------------------------- #
# Compaction and page copies
# --------------------------------------------------------------------------- #
def compact_reference(
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    keep_idx: torch.Tensor,
    keep_counts: torch.Tensor,
    seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Out-of-place compaction.

    For each row ``b`` and KV head ``g``, logical slot ``i < keep_counts[b]``
    (through ``page_table[b]``) receives the key and value of logical token
    ``keep_idx[b, g, i]`` (head ``g`` only), read from the ORIGINAL cache.
    Everything else is unchanged. ``seq_lens`` is only used for checks.
    """
    out = kv_cache.clone()
    B, Hkv, _ = keep_idx.shape
    block_size = kv_cache.shape[2]
    kc = [int(x) for x in keep_counts.tolist()]
    sl = [int(x) for x in seq_lens.tolist()] if seq_lens is not None else None
    for b in range(B):
        n = kc[b]
        if n == 0:
            continue
        pt = page_table[b].to(torch.long)
        dst = torch.arange(n, device=kv_cache.device)
        dpage, dslot = pt[dst // block_size], dst % block_size
        for g in range(Hkv):
            src = keep_idx[b, g, :n].to(torch.long)
            if sl is not None:
                assert int(src.max()) < sl[b], "keep_idx beyond the sequence"
            spage, sslot = pt[src // block_size], src % block_size
            out[dpage, :, dslot, g] = kv_cache[spage, :, sslot, g]
    return out


def copy_pages_reference(kv_cache: torch.Tensor, src_pages: torch.Tensor, dst_pages: torch.Tensor) -> torch.Tensor:
    """Out-of-place whole-page copy ``out[dst[i]] = kv_cache[src[i]]`` (disjoint sets)."""
    out = kv_cache.clone()
    out[dst_pages.to(torch.long)] = kv_cache[src_pages.to(torch.long)]
    return out


def record_queries_reference(
    queries: torch.Tensor, lse_rows: torch.Tensor, dst: torch.Tensor, query: torch.Tensor, lse: torch.Tensor
) -> None:
    """In place: ring row `dst[t]` of `queries` ([..., H, D]) and `lse_rows` ([..., H]) receives
    token t's query `query[t]` ([T, H, D]) and LSE `lse[:, t]` ([H, >= T]), for t < T (torch's
    `index_copy_`; duplicate destinations leave their row arbitrary)."""
    num_tokens, num_heads, head_size = query.shape
    index = dst[:num_tokens]
    queries.view(-1, num_heads, head_size).index_copy_(0, index, query.to(queries.dtype))
    lse_rows.view(-1, num_heads).index_copy_(0, index, lse[:, :num_tokens].t().to(lse_rows.dtype))
