"""Helpers shared by the kernel tests (random paged caches, error metrics)."""

from __future__ import annotations

import torch
from vllm_kvcomp.kernels import reference as ref

PAD_PAGE_ID = 1_000_000_007 % (2**31 - 1)  # page-table padding: far out of range, must never be read


def make_paged_cache(
    seq_lens,
    *,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    seed: int,
    spare_pages: int = 5,
    pad_cols: int = 2,
):
    """Random cache + scrambled page table: rows own disjoint, non-monotone pages; padding is garbage."""
    g = torch.Generator().manual_seed(seed)
    R = len(seq_lens)
    need = [max(1, -(-int(L) // block_size)) for L in seq_lens]
    max_pages = max(need) + pad_cols
    num_pages = sum(need) + spare_pages
    kv = torch.randn((num_pages, 2, block_size, num_kv_heads, head_size), generator=g).to(dtype)
    perm = torch.randperm(num_pages, generator=g)
    pt = torch.full((R, max_pages), PAD_PAGE_ID, dtype=torch.int32)
    pos = 0
    for r, n in enumerate(need):
        pt[r, :n] = perm[pos : pos + n].to(torch.int32)
        pos += n
    # some padding columns hold negative garbage too
    pt[:, -1] = -3
    return kv.to(device), pt.to(device)


def score_inputs(seq_lens, win, *, Hkv, G, D, block_size, dtype, device, seed, W=None):
    """Window queries (padding rows NaN), window and sequence lengths, paged cache, page table."""
    kv, pt = make_paged_cache(
        seq_lens, num_kv_heads=Hkv, head_size=D, block_size=block_size, dtype=dtype, device=device, seed=seed
    )
    g = torch.Generator().manual_seed(seed + 1)
    R = len(seq_lens)
    W = W or max(win)
    q = torch.randn((R, W, Hkv * G, D), generator=g).to(dtype)
    for r, w in enumerate(win):
        q[r, w:] = float("nan")  # padding rows are garbage: must never be read
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    wl = torch.tensor(win, dtype=torch.int32)
    return q.to(device), wl.to(device), kv, pt, sl.to(device)


def used_pages(page_table: torch.Tensor, seq_lens, block_size: int) -> set[int]:
    out = set()
    for r, L in enumerate(seq_lens):
        n = max(1, -(-int(L) // block_size))
        out.update(int(p) for p in page_table[r, :n].tolist())
    return out


def rel_err(out: torch.Tensor, expect: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the finite entries of ref (inf pattern checked separately)."""
    fin = torch.isfinite(expect)
    a = out[fin].double()
    b = expect[fin].double()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def assert_close_scores(out, expect, tol: float, what: str = ""):
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    fin_ref = torch.isfinite(expect)
    fin_out = torch.isfinite(out)
    assert torch.equal(fin_ref, fin_out), f"{what}: finite/-inf pattern differs"
    assert torch.equal(out[~fin_ref], expect[~fin_ref]), f"{what}: non-finite values differ"
    err = rel_err(out, expect)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"
    return err


def window_lse_batch(q, wl, kv, pt, sl, scale, fill=float("nan")):
    """FlashAttention-style softmax_lse [R, W, Hq] of the window queries; padding rows = fill."""
    R, W, Hq, _ = q.shape
    lse = torch.full((R, W, Hq), fill, dtype=torch.float32, device=q.device)
    for r in range(R):
        L, w = int(sl[r]), int(wl[r])
        keys = ref.gather_keys(kv, pt[r], L)
        lse[r, :w] = ref.window_lse_reference(q[r, :w], keys, scale=scale)
    return lse


TOL = {torch.bfloat16: 5e-3, torch.float16: 1e-3}
