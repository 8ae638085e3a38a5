"""Large-shape checks on CUDA (skipped without a GPU; run on the H100).

Self-contained: builds its own paged caches on the GPU, compares the Triton
kernels with the float64 / exact torch references at production-like sizes.
"""

from __future__ import annotations

import pytest
import torch
from vllm_kvcomp.kernels import (
    compact_kv_,
    compact_reference,
    copy_pages_,
    copy_pages_reference,
    score_gather,
    score_gather_reference,
    select_keep_indices,
    select_keep_indices_batched_reference,
)
from vllm_kvcomp.kernels.reference import gather_keys, window_lse_reference

pytestmark = pytest.mark.gpu

HKV, HQ, D, W = 8, 32, 128, 32
SEQ_LENS = [16384, 16000, 9001, 12345]


def _big_cache(seq_lens, block_size, dtype, seed, spare=64):
    g = torch.Generator(device="cuda").manual_seed(seed)
    need = [-(-L // block_size) for L in seq_lens]
    num_pages = sum(need) + spare
    kv = torch.randn((num_pages, 2, block_size, HKV, D), generator=g, device="cuda", dtype=torch.float32).to(dtype)
    perm = torch.randperm(num_pages, generator=g, device="cuda").to(torch.int32)
    pt = torch.full((len(seq_lens), max(need) + 3), 2**30, dtype=torch.int32, device="cuda")  # garbage padding
    pos = 0
    for r, n in enumerate(need):
        pt[r, :n] = perm[pos : pos + n]
        pos += n
    return kv, pt


def _rel(a, b):
    fin = torch.isfinite(b)
    assert torch.equal(fin, torch.isfinite(a))
    return ((a[fin].double() - b[fin].double()).norm() / b[fin].double().norm()).item()


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_score_gather_large(dtype, block_size):
    torch.manual_seed(0)
    kv, pt = _big_cache(SEQ_LENS, block_size, dtype, seed=block_size)
    R = len(SEQ_LENS)
    sl = torch.tensor(SEQ_LENS, dtype=torch.int32, device="cuda")
    wl = torch.tensor([W, W, 1, 17], dtype=torch.int32, device="cuda")
    q = torch.randn((R, W, HQ, D), device="cuda").to(dtype)
    scale = D**-0.5
    lse = torch.full((R, W, HQ), float("nan"), device="cuda")
    for r in range(R):
        keys = gather_keys(kv, pt[r], SEQ_LENS[r])
        lse[r, : int(wl[r])] = window_lse_reference(q[r, : int(wl[r])], keys, scale=scale)
    S = max(SEQ_LENS) + 7
    tol = 5e-3 if dtype == torch.bfloat16 else 1e-3
    for pool_kernel, pool_type, square in [(7, "max", False), (5, "avg", True)]:
        kw = dict(scale=scale, pool_kernel=pool_kernel, pool_type=pool_type, square=square, max_seq_len=S)
        expect = score_gather_reference(q, wl, kv, pt, sl, **kw)
        for given in (lse, None):
            out = (
                torch.full((R, HKV, S), float("nan"), device="cuda"),
                torch.full((R, HKV, S), float("nan"), device="cuda"),
            )
            got = score_gather(q, wl, kv, pt, sl, window_lse=given, out=out, **kw)
            torch.cuda.synchronize()
            assert not torch.isnan(got.scores).any() and not torch.isnan(got.mass).any()
            e_s, e_m = _rel(got.scores, expect.scores), _rel(got.mass, expect.mass)
            assert e_s < tol and e_m < tol, (pool_type, given is None, e_s, e_m)


@pytest.mark.parametrize("block_size", [16, 32])
def test_compaction_large(block_size):
    kv, pt = _big_cache(SEQ_LENS, block_size, torch.bfloat16, seed=3 + block_size)
    R = len(SEQ_LENS)
    sl = torch.tensor(SEQ_LENS, dtype=torch.int32, device="cuda")
    keep = torch.tensor([max(68, int(0.2 * L)) for L in SEQ_LENS], dtype=torch.int32, device="cuda")
    keep[1] = SEQ_LENS[1]  # one row keeps everything
    scores = torch.rand((R, HKV, max(SEQ_LENS)), device="cuda")
    keep_idx = select_keep_indices(scores, sl, keep, num_sinks=4, num_recent=64)
    assert torch.equal(keep_idx.cpu(), select_keep_indices_batched_reference(scores.cpu(), sl.cpu(), keep.cpu(), 4, 64))
    expect = compact_reference(kv, pt, keep_idx, keep, sl)
    for _ in range(2):  # a race would show as a run-to-run difference
        work = kv.clone()
        compact_kv_(work, pt, keep_idx, keep, seq_lens=sl, validate=True)
        torch.cuda.synchronize()
        assert torch.equal(work, expect)
    # adversarial overlap: drop only the first token of every head
    drop_first = torch.arange(1, min(SEQ_LENS), device="cuda", dtype=torch.int32).expand(R, HKV, -1).contiguous()
    cnt = torch.full((R,), min(SEQ_LENS) - 1, dtype=torch.int32, device="cuda")
    expect = compact_reference(kv, pt, drop_first, cnt)
    work = kv.clone()
    compact_kv_(work, pt, drop_first, cnt)
    assert torch.equal(work, expect)


def test_copy_pages_large():
    kv, _ = _big_cache([16384] * 4, 16, torch.bfloat16, seed=1, spare=0)
    n = kv.shape[0]
    perm = torch.randperm(n, device="cuda")
    src, dst = perm[: n // 3], perm[n // 3 : 2 * (n // 3)]
    expect = copy_pages_reference(kv, src, dst)
    copy_pages_(kv, src.to(torch.int32), dst)
    assert torch.equal(kv, expect)
