"""compact_kv_, copy_pages_ and select_keep_indices against the torch references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvtest_utils import make_paged_cache, used_pages
from vllm_kvcomp.kernels import (
    KEEP_IDX_SENTINEL,
    compact_kv_,
    compact_reference,
    copy_pages_,
    copy_pages_reference,
    select_keep_indices,
    select_keep_indices_batched_reference,
)


def _random_scores(B, Hkv, S, seed, device, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many ties
        s = torch.randint(0, 3, (B, Hkv, S), generator=g).float()
    else:
        s = torch.rand((B, Hkv, S), generator=g)
    return s.to(device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("block_k", [4, 64])
def test_compact_matches_reference(device, dtype, block_size, block_k):
    seq_lens = [40, 1, 70, 33]
    keep = [13, 1, 70, 20]  # varying per row; row 2 keeps everything (no-op row)
    Hkv, D = 3, 16
    seed = block_size + block_k + (dtype == torch.float16)
    kv, pt = make_paged_cache(
        seq_lens, num_kv_heads=Hkv, head_size=D, block_size=block_size, dtype=dtype, device=device, seed=seed
    )
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    kc = torch.tensor(keep, dtype=torch.int32, device=device)
    scores = _random_scores(len(seq_lens), Hkv, max(seq_lens), seed, device)
    keep_idx = select_keep_indices(scores, sl, kc, num_sinks=2, num_recent=4)
    original = kv.clone()
    expect = compact_reference(kv, pt, keep_idx, kc, sl)
    compact_kv_(kv, pt, keep_idx, kc, seq_lens=sl, validate=True, block_k=block_k)
    assert torch.equal(kv, expect), "compaction differs from the reference"
    # pages of no request are bit-identical
    untouched = sorted(set(range(kv.shape[0])) - used_pages(pt, seq_lens, block_size))
    assert untouched and torch.equal(kv[untouched], original[untouched])
    # slots >= keep_counts of every row are bit-identical, and the no-op row is unchanged
    for b, L in enumerate(seq_lens):
        for t in range(keep[b], L):
            p, s = int(pt[b, t // block_size]), t % block_size
            assert torch.equal(kv[p, :, s], original[p, :, s])
    for p in pt[2, : -(-70 // block_size)].tolist():
        assert torch.equal(kv[p], original[p])


def test_compact_full_budget_is_noop(device):
    seq_lens = [17, 64, 5]
    kv, pt = make_paged_cache(
        seq_lens, num_kv_heads=2, head_size=16, block_size=16, dtype=torch.bfloat16, device=device, seed=5
    )
    original = kv.clone()
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    keep_idx = select_keep_indices(_random_scores(3, 2, 64, 5, device), sl, sl, num_sinks=4, num_recent=8)
    for b, L in enumerate(seq_lens):
        assert keep_idx[b, :, :L].tolist() == [list(range(L))] * 2
    compact_kv_(kv, pt, keep_idx, sl, seq_lens=sl, validate=True)
    assert torch.equal(kv, original)


@pytest.mark.parametrize("pattern", ["drop_first", "odds", "tail_heavy"])
def test_compact_overlapping_sources_and_destinations(device, pattern):
    """Sources inside the destination range of the same and later chunks."""
    L, Hkv, bs = 90, 2, 16
    kv, pt = make_paged_cache(
        [L, L], num_kv_heads=Hkv, head_size=16, block_size=bs, dtype=torch.float16, device=device, seed=9
    )
    if pattern == "drop_first":
        rows = [list(range(1, L)), list(range(2, L))]
    elif pattern == "odds":
        rows = [list(range(1, L, 2)), list(range(0, L, 3))]
    else:
        rows = [list(range(L - 30, L)), [0] + list(range(50, L))]
    counts = [len(r) for r in rows]
    K = max(counts)
    keep_idx = torch.full((2, Hkv, K), KEEP_IDX_SENTINEL, dtype=torch.int32)
    for b, r in enumerate(rows):
        keep_idx[b, 0, : len(r)] = torch.tensor(r)
        keep_idx[b, 1, : len(r)] = torch.tensor(r)  # same survivors for both heads of a row...
    keep_idx[1, 1, : counts[1]] = torch.tensor(
        sorted(torch.randperm(L, generator=torch.Generator().manual_seed(1))[: counts[1]].tolist())
    )
    keep_idx = keep_idx.to(device)
    kc = torch.tensor(counts, dtype=torch.int32, device=device)
    expect = compact_reference(kv, pt, keep_idx, kc)
    for bk in (4, 16):
        work = kv.clone()
        compact_kv_(work, pt, keep_idx, kc, validate=True, block_k=bk)
        assert torch.equal(work, expect), f"block_k={bk}"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_compact_random_property(device, data):
    B = data.draw(st.integers(1, 3))
    seq_lens = [data.draw(st.integers(1, 60)) for _ in range(B)]
    keep = [data.draw(st.integers(0, L)) for L in seq_lens]
    bs = data.draw(st.sampled_from([16, 32]))
    bk = data.draw(st.sampled_from([4, 8, 32]))
    Hkv = data.draw(st.integers(1, 3))
    seed = data.draw(st.integers(0, 10_000))
    kv, pt = make_paged_cache(
        seq_lens, num_kv_heads=Hkv, head_size=16, block_size=bs, dtype=torch.bfloat16, device=device, seed=seed
    )
    g = torch.Generator().manual_seed(seed)
    K = max(max(keep), 1)
    keep_idx = torch.full((B, Hkv, K), KEEP_IDX_SENTINEL, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            keep_idx[b, h, : keep[b]] = torch.sort(torch.randperm(seq_lens[b], generator=g)[: keep[b]]).values.to(
                torch.int32
            )
    keep_idx = keep_idx.to(device)
    kc = torch.tensor(keep, dtype=torch.int32, device=device)
    expect = compact_reference(kv, pt, keep_idx, kc)
    compact_kv_(kv, pt, keep_idx, kc, validate=True, block_k=bk)
    assert torch.equal(kv, expect)


def test_compact_validate_rejects_bad_indices(device):
    kv, pt = make_paged_cache(
        [20, 20], num_kv_heads=1, head_size=16, block_size=16, dtype=torch.bfloat16, device=device, seed=0
    )
    sl = torch.tensor([20, 20], device=device)
    kc = torch.tensor([3, 3], device=device)
    bad_order = torch.tensor([[[0, 5, 4]], [[0, 1, 2]]], dtype=torch.int32, device=device)
    with pytest.raises(AssertionError):
        compact_kv_(kv, pt, bad_order, kc, seq_lens=sl, validate=True)
    too_far = torch.tensor([[[0, 5, 20]], [[0, 1, 2]]], dtype=torch.int32, device=device)
    with pytest.raises(AssertionError):
        compact_kv_(kv, pt, too_far, kc, seq_lens=sl, validate=True)
    shared = pt.clone()
    shared[1, 0] = shared[0, 0]
    ok = torch.tensor([[[0, 1, 2]], [[0, 1, 2]]], dtype=torch.int32, device=device)
    with pytest.raises(AssertionError):
        compact_kv_(kv, shared, ok, kc, seq_lens=sl, validate=True)


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("block_size", [16, 32])
def test_copy_pages(device, idx_dtype, block_size):
    g = torch.Generator().manual_seed(block_size)
    kv = torch.randn((12, 2, block_size, 3, 24), generator=g).to(torch.bfloat16).to(device)
    src = torch.tensor([7, 0, 3, 11], dtype=idx_dtype, device=device)
    dst = torch.tensor([2, 9, 4, 1], dtype=idx_dtype, device=device)
    expect = copy_pages_reference(kv, src, dst)
    copy_pages_(kv, src, dst, validate=True)
    assert torch.equal(kv, expect)
    copy_pages_(kv, src[:0], dst[:0])  # empty is a no-op
    assert torch.equal(kv, expect)
    with pytest.raises(AssertionError):
        copy_pages_(kv, torch.tensor([1, 2], device=device), torch.tensor([2, 3], device=device), validate=True)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("sinks,recent", [(0, 0), (4, 8), (2, 1)])
def test_select_matches_reference(device, ties, sinks, recent):
    seq_lens = [50, 12, 1, 33]
    keep = [20, 12, 1, 14]
    scores = _random_scores(4, 3, 55, 17 + sinks, device, ties=ties)
    scores[0, :, 50:] = 100.0  # beyond the length: must be ignored
    sl = torch.tensor(seq_lens, device=device)
    kc = torch.tensor(keep, device=device)
    got = select_keep_indices(scores, sl, kc, sinks, recent)
    exp = select_keep_indices_batched_reference(scores, sl, kc, sinks, recent)
    assert got.dtype == torch.int32 and got.shape == (4, 3, 20)
    assert torch.equal(got, exp)
    for b, L in enumerate(seq_lens):
        row = got[b, :, : keep[b]]
        assert bool((row[:, 1:] > row[:, :-1]).all()) and int(row.max()) < L
        assert bool((got[b, :, keep[b] :] == KEEP_IDX_SENTINEL).all())
        forced = {t for t in range(L) if t < sinks or t >= L - recent}
        for h in range(3):
            assert forced <= set(row[h].tolist())


def test_select_ties_go_to_lower_index(device):
    scores = torch.ones(1, 2, 10, device=device)
    scores[0, 1, 7] = 2.0
    got = select_keep_indices(scores, torch.tensor([10]), torch.tensor([4]), num_sinks=1, num_recent=1)
    assert got.tolist() == [[[0, 1, 2, 9], [0, 1, 7, 9]]]
    with pytest.raises(AssertionError):
        select_keep_indices(scores, torch.tensor([10]), torch.tensor([1]), num_sinks=1, num_recent=1)
