"""Triton score-gather: SnapKV observation-window scores straight from vLLM's paged KV cache.

For every request ``r`` and KV head ``g`` the window queries of the group's
query heads (``G = Hq // Hkv`` of them, ``W`` queries each) are scored against
every key of the request, read ONCE through the page table:

    p[h, i, t] = exp(scale * q[h, i] . k[g, t] - lse[h, i])   (t <= pos_i, else 0)
    a[h, t]    = sum_i p            (or sum_i p**2 when square)
    mass[g, t] = sum_{h in g} sum_i p
    scores[g, t] = sum_{h in g} pool(a[h])[t]

This module is the host side: argument checks, tiling, launches. The jitted
kernels are in ``score_gather_kernels.py``, their autotuned launch
configurations in ``score_gather_configs.py``. Without the Triton interpreter
a CPU call falls back to the torch reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from .common import interpreting
from .reference import ScoreOutput, score_gather_reference
from .score_gather_configs import LSE_CONFIGS, LSE_SPLIT, WINDOW_SUM_CONFIGS, fit_dot_launch
from .score_gather_kernels import LN2, LOG2E, lse_partial_kernel, pool_gqa_kernel, window_sum_kernel

__all__ = ["score_gather", "ScoreOutput"]


class _Shapes(NamedTuple):
    R: int
    W: int
    Hq: int
    Hkv: int
    G: int
    D: int
    PAGE: int
    S: int


class _Tiling(NamedTuple):
    """Block sizes fixed by the shapes, and the caller's tiling when it fixed one."""

    BG: int  # query heads of a group, padded to a power of two
    BW: int  # window rows per head, padded
    BM: int  # query rows of a tile: BG * BW >= 16 (tl.dot)
    BD: int  # head dim, padded
    explicit: tuple[int, int, int, int] | None  # (BT, TPP, BT_LSE, TPS), or None: autotuned configs


def _check_args(window_queries, kv_cache, page_table, seq_lens, pool_kernel, pool_type, max_seq_len) -> _Shapes:
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
    if page_table.dim() != 2 or page_table.shape[0] != R:
        raise ValueError("page_table must be [R, max_pages]")
    if max_seq_len is not None:
        S = int(max_seq_len)
    else:
        S = int(seq_lens.max().item()) if R > 0 else 0
    return _Shapes(R, W, Hq, Hkv, Hq // Hkv, D, PAGE, S)


def _validate(shp: _Shapes, window_lens, seq_lens, page_table, window_lse) -> None:
    sl = seq_lens.tolist()
    wl = window_lens.tolist()
    assert all(s <= shp.S for s in sl), "seq_lens beyond max_seq_len"
    assert all((1 <= w <= min(shp.W, s)) or s == 0 for w, s in zip(wl, sl, strict=True)), (
        "window_lens outside 1..min(W, L)"
    )
    assert all(-(-s // shp.PAGE) <= page_table.shape[1] for s in sl), "page_table too narrow"
    if window_lse is not None:
        assert tuple(window_lse.shape) == (shp.R, shp.W, shp.Hq), "window_lse must be [R, W, Hq]"


def _outputs(out, shp: _Shapes, dev) -> tuple[torch.Tensor, torch.Tensor]:
    R, Hkv, S = shp.R, shp.Hkv, shp.S
    if out is None:
        return (
            torch.empty((R, Hkv, S), dtype=torch.float32, device=dev),
            torch.empty((R, Hkv, S), dtype=torch.float32, device=dev),
        )
    scores, mass = out
    for name, x in (("scores", scores), ("mass", mass)):
        if tuple(x.shape) != (R, Hkv, S) or x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"out.{name} must be contiguous fp32 [{R}, {Hkv}, {S}]")
    return scores, mass


def _tiling(shp: _Shapes, block_t: int | None, tiles_per_program: int | None) -> _Tiling:
    BG = triton.next_power_of_2(shp.G)
    BW = max(triton.next_power_of_2(shp.W), triton.next_power_of_2(-(-16 // BG)))  # BM = BG * BW >= 16 for tl.dot
    BD = max(16, triton.next_power_of_2(shp.D))
    explicit = None
    if block_t or tiles_per_program:  # the caller fixes the tiling (tests, experiments): no autotune
        ws, lse = WINDOW_SUM_CONFIGS[0].kwargs, LSE_CONFIGS[0].kwargs  # defaults of what is not given
        BT = int(block_t or ws["BT"])
        BT_LSE = int(block_t or lse["BT"])
        for bt in (BT, BT_LSE):
            assert bt >= 16 and bt & (bt - 1) == 0, "block_t must be a power of two >= 16"
        TPP = triton.next_power_of_2(int(tiles_per_program or ws["TPP"]))
        TPS = triton.next_power_of_2(int(tiles_per_program or lse["TPS"]))
        explicit = (BT, TPP, BT_LSE, TPS)
    return _Tiling(BG, BW, BG * BW, BD, explicit)


def _fixed_launch(default: triton.Config, til: _Tiling, bt: int, esize: int) -> dict:
    """Launch options of a caller-fixed tiling: the default config's, fitted as autotune's pruning does."""
    if interpreting():
        return {}
    nw, ns = fit_dot_launch(default.num_warps, default.num_stages, til.BM, bt, til.BD, esize)
    return {"num_warps": nw, "num_stages": ns}


def _lse_pass(shp: _Shapes, til: _Tiling, head: tuple, scale_log2e: float, meta: dict, esize: int, dev) -> tuple:
    """Natural-log LSE of the window queries (two-pass mode): ``(lse, strides (r, g, j, i))``."""
    R, Hkv, S = shp.R, shp.Hkv, shp.S
    split = til.explicit[2] * til.explicit[3] if til.explicit else LSE_SPLIT
    NS = triton.cdiv(S, split)
    pm = torch.empty((R, Hkv, NS, til.BM), dtype=torch.float32, device=dev)
    ps = torch.empty_like(pm)
    grid, args = (NS, Hkv, R), (*head, pm, ps, NS, scale_log2e)
    if til.explicit:
        _, _, BT_LSE, TPS = til.explicit
        launch = _fixed_launch(LSE_CONFIGS[0], til, BT_LSE, esize)
        lse_partial_kernel.fn[grid](*args, **meta, BT=BT_LSE, TPS=TPS, **launch)
    else:  # every candidate config covers LSE_SPLIT keys per program
        lse_partial_kernel[grid](*args, **meta)
    # combine splits (natural log); rows that saw no key stay -inf and are masked later
    lse = torch.logsumexp(pm * LN2 + torch.log(ps), dim=2)  # [R, Hkv, BM]
    lse = lse.view(R, Hkv, til.BG, til.BW)
    return (lse, *lse.stride())


def _given_lse(window_lse: torch.Tensor, shp: _Shapes) -> tuple:
    if window_lse.dim() != 3 or window_lse.shape[0] != shp.R or window_lse.shape[2] != shp.Hq:
        raise ValueError("window_lse must be [R, W, Hq]")
    lse = window_lse.to(torch.float32)
    sr, sw, sh = lse.stride()
    return (lse, sr, shp.G * sh, sh, sw)


def _window_sums(shp: _Shapes, til: _Tiling, args: tuple, meta: dict, esize: int) -> None:
    S, Hkv, R = shp.S, shp.Hkv, shp.R
    if til.explicit:
        BT, TPP = til.explicit[:2]
        launch = _fixed_launch(WINDOW_SUM_CONFIGS[0], til, BT, esize)
        window_sum_kernel.fn[(triton.cdiv(S, BT * TPP), Hkv, R)](*args, **meta, BT=BT, TPP=TPP, **launch)
    else:
        window_sum_kernel[lambda cfg: (triton.cdiv(S, cfg["BT"] * cfg["TPP"]), Hkv, R)](*args, **meta)


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
        block_t / tiles_per_program: fix the tiling (keys per tile; key tiles
            per program, rounded up to a power of two) of both passes instead of
            the autotuned configs (``score_gather_configs``); what is not given
            takes the default config's value.
        validate: check the index preconditions on the host (syncs).
        out: optional preallocated ``(scores, mass)``, each contiguous fp32
            ``[R, Hkv, S]``; every element is overwritten.

    Returns:
        ``ScoreOutput(scores [R, Hkv, S] fp32, mass [R, Hkv, S] fp32)``; every
        element is written (``-inf`` / ``0`` at ``t >= seq_lens[r]``).
    """
    shp = _check_args(window_queries, kv_cache, page_table, seq_lens, pool_kernel, pool_type, max_seq_len)
    if validate:
        _validate(shp, window_lens, seq_lens, page_table, window_lse)
    dev = window_queries.device
    scores, mass = _outputs(out, shp, dev)
    if dev.type != "cuda" and not interpreting():
        # CPU without the Triton interpreter: the torch reference (exact LSE).
        ref = score_gather_reference(
            window_queries, window_lens, kv_cache, page_table, seq_lens,
            scale=scale, pool_kernel=pool_kernel, pool_type=pool_type, square=square, max_seq_len=shp.S,
        )  # fmt: skip
        scores.copy_(ref.scores)
        mass.copy_(ref.mass)
        return ScoreOutput(scores, mass)
    if shp.R == 0 or shp.S == 0:
        return ScoreOutput(scores, mass)

    window_lens = window_lens.to(device=dev, dtype=torch.int32).contiguous()
    seq_lens = seq_lens.to(device=dev, dtype=torch.int32).contiguous()
    page_table = page_table.to(torch.int32)
    til = _tiling(shp, block_t, tiles_per_program)
    scale_log2e = float(scale) * LOG2E
    esize = kv_cache.element_size()
    q_args = (window_queries, *window_queries.stride())
    ks = kv_cache.stride()
    k_args = (kv_cache, ks[0], ks[2], ks[3], ks[4])  # keys: kv index 0 => no offset
    head = (*q_args, window_lens, seq_lens, page_table, page_table.stride(0), *k_args)  # leading args of both passes
    meta = dict(G=shp.G, BW=til.BW, BM=til.BM, D=shp.D, BD=til.BD, PAGE=shp.PAGE, DOT_F32=interpreting())  # see _dot_t

    if window_lse is None:
        lse_args = _lse_pass(shp, til, head, scale_log2e, meta, esize, dev)
    else:
        lse_args = _given_lse(window_lse, shp)
    a = torch.empty((shp.R, shp.Hq, shp.S), dtype=torch.float32, device=dev)
    ws_args = (*head, *lse_args, a, mass, shp.S, scale_log2e)
    _window_sums(shp, til, ws_args, dict(meta, BG=til.BG, SQUARE=bool(square)), esize)
    pool_gqa_kernel[lambda cfg: (triton.cdiv(shp.S, cfg["BT"]), shp.Hkv, shp.R)](
        a, seq_lens, scores, shp.S, G=shp.G, BG=til.BG, K=int(pool_kernel), AVG=(pool_type == "avg")
    )
    return ScoreOutput(scores, mass)
